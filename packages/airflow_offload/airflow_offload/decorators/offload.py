"""``@task.offload``: run a Python callable inside the container on the site.

The callable and its arguments travel pickled (by value, with cloudpickle) in the job's directory, staged in
the same round trip as the submission; the return value comes back the same way and becomes the task's XCom;
an exception fails the task with the remote traceback. The image needs Python and ``cloudpickle``.

Unpickling runs code, and the result comes from whatever host the connection names: so the job signs it with
a key made for this try (HMAC-SHA256), which reaches the job as a secret and the resuming worker through the
trigger (whose arguments Airflow keeps encrypted), and the worker unpickles only a result that carries it.

    @task.offload(site="leonardo", image="docker://me/analysis:1", gpus=1)
    def analyse(chunk: int) -> float: ...
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import pickle
import secrets
import sys
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

import offload
from airflow_offload.operators.offload import OffloadOperator
from airflow_offload.version_compat import AirflowException, DecoratedOperator, task_decorator_factory

RESULT_KEY = "OFFLOAD_RESULT_KEY"
RUNNER = """
import hashlib, hmac, os, pickle, sys, traceback
d = os.environ["OFFLOAD_JOB_DIR"]
key = bytes.fromhex(os.environ.pop("OFFLOAD_RESULT_KEY"))
with open(os.path.join(d, "input.pkl"), "rb") as f:
    fn, args, kwargs = pickle.load(f)
try:
    result = fn(*args, **kwargs)
except BaseException:
    text = traceback.format_exc()
    sys.stderr.write(text)
    with open(os.path.join(d, "error.txt"), "w") as f:
        f.write(text)
    sys.exit(1)
import cloudpickle
data = cloudpickle.dumps(result)
with open(os.path.join(d, "output.pkl"), "wb") as f:
    f.write(hmac.new(key, data, hashlib.sha256).digest() + data)
"""


class OffloadDecoratedOperator(DecoratedOperator, OffloadOperator):
    custom_operator_name = "@task.offload"
    template_fields: Sequence[str] = (
        *DecoratedOperator.template_fields,
        *(f for f in OffloadOperator.template_fields if f not in ("command", "job_name")),
    )

    def __init__(self, *, python_callable: Callable, op_args: Any = None, op_kwargs: Any = None,
                 python: str | None = None, **kwargs: Any) -> None:  # fmt: skip
        kwargs.pop("command", None)
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs,
                         command=["python3", "-c", RUNNER], **kwargs)  # fmt: skip
        self.python = python

    def build_spec(self, context: Any) -> offload.JobSpec:
        # Without a container on this machine the payload runs with this very interpreter (it has cloudpickle).
        self.command = [self.python or self.hook.get_site().python, "-c", RUNNER]
        self.result_key = secrets.token_hex(32)
        spec = super().build_spec(context)
        return dataclasses.replace(spec, secrets={**spec.secrets, RESULT_KEY: self.result_key})

    def _reattach_refused(self) -> str | None:
        # A job an earlier try left signs its result with that try's key, which is gone with its worker: its
        # result could not be trusted, so it is cancelled and the work done again under this try's key.
        return "its result could not be verified (signed with that try's key)"

    def job_files(self, context: Any) -> dict[str, bytes]:
        module = sys.modules.get(getattr(self.python_callable, "__module__", ""), None)
        if module is not None and module.__name__ not in ("__main__", "builtins"):
            # The DAG file is not importable in the container: ship the callable's module by value.
            cloudpickle.register_pickle_by_value(module)
        args = [_plain(a) for a in self.op_args]
        kwargs = {k: _plain(v) for k, v in self.op_kwargs.items()}
        payload = cloudpickle.dumps((self.python_callable, args, kwargs))
        return {"input.pkl": payload}

    def result(self, job: offload.Job, last_line: str) -> Any:
        signed = job.get("output.pkl")
        if not signed:
            raise AirflowException(f"job {job.id} completed but left no return value in {job.ref.jobdir}")
        return pickle.loads(verified(signed, self.result_key, job))

    def _finish(self, context: Any, job: offload.Job, status: offload.JobStatus, last_line: str) -> Any:
        if status.state is not offload.JobState.COMPLETED:
            remote = job.get("error.txt").decode(errors="replace")
            if remote:
                self._push(context, state=status.state.value, exit_code=status.exit_code)
                raise AirflowException(f"the function raised on the site (job {job.id}):\n{remote}")
        return super()._finish(context, job, status, last_line)


def verified(signed: bytes, key: str | None, job: offload.Job) -> bytes:
    """The pickled result, once its signature says the job of this try made it (else no unpickling at all)."""
    mac, data = signed[:32], signed[32:]
    if not key or not hmac.compare_digest(mac, hmac.new(bytes.fromhex(key), data, hashlib.sha256).digest()):
        raise AirflowException(
            f"the result of job {job.id} ({job.ref.jobdir}/output.pkl) is not signed with this task's key: "
            "refusing to unpickle it. Check that the connection's host is the site you meant; clear the task to "
            "run it again."
        )
    return data


def _plain(value: Any) -> Any:
    """Lazy XCom sequences (from mapped upstream tasks) hold a connection to Airflow: send their values.

    By index up to their length: iterating one asks for the element after the last, which Airflow answers
    with an 'XCom not found' error in the task log of a run that went well."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes | list | tuple):
        return [value[i] for i in range(len(value))]
    return value


def offload_task(python_callable: Callable | None = None, multiple_outputs: bool | None = None, **kwargs: Any):
    """``@task.offload(site=..., image=..., gpus=..., ...)``: any :class:`OffloadOperator` argument."""
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=OffloadDecoratedOperator,
        **kwargs,
    )
