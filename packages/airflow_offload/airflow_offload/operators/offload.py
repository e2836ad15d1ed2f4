"""``OffloadOperator``: run a container as a SLURM job on an HPC site, sync or deferrable.

A task instance's job has a deterministic name (dag, task, run, map index), so when a worker dies while its
job queues or runs, the retry finds that job on the site and **reattaches** instead of submitting the work
twice. A job that already ended is not reused: a retry or a cleared task runs the work again. Because the
name is on the site itself, this needs no state written between submitting and polling (the gap Airflow's
``ResumableJobMixin`` documents) and works from any worker.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import offload
from airflow_offload.hooks.offload import OffloadHook
from airflow_offload.triggers.offload import OffloadJobTrigger
from airflow_offload.version_compat import AirflowException, BaseOperator


class OffloadOperator(BaseOperator):
    """Run ``command`` in ``image`` on an HPC site as a SLURM job; its output streams into the task log.

    :param command: the argv to run (templated), e.g. ``["python3", "train.py", "--date", "{{ ds }}"]``
    :param image: container image (templated; default: the site's)
    :param gpus, cpus, memory, walltime, partition, account, qos: what the job asks for
    :param env: environment for the payload (templated)
    :param secrets: environment the payload gets as secrets: never templated, rendered, logged or written into
        a script
    :param mounts: ``"SRC[:DST[:ro]]"`` site paths to bind into the container (templated)
    :param site: an offload site profile; or ``offload_conn_id``: an Airflow connection of type ``offload``
    :param deferrable: wait in the triggerer, freeing the worker slot while the job queues and runs
    :param poll_interval: seconds between status checks (default: the site's)

    XCom: the return value is the last line of the job's output (like BashOperator); ``job_id``, ``state``
    and ``exit_code`` are pushed under those keys. A job that does not complete fails the task with the tail
    of its log.
    """

    template_fields: Sequence[str] = ("command", "image", "env", "mounts", "workdir", "job_name")
    template_fields_renderers = {"command": "py", "env": "json"}
    ui_color = "#c6e2ff"

    def __init__(
        self,
        *,
        command: Sequence[str],
        image: str | None = None,
        gpus: int = 0,
        cpus: int | None = None,
        memory: str | None = None,
        walltime: str | None = None,
        partition: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        mounts: Sequence[str] | None = None,
        workdir: str | None = None,
        site: str | None = None,
        offload_conn_id: str | None = None,
        job_name: str | None = None,
        deferrable: bool = False,
        poll_interval: float | None = None,
        log_tail_lines: int = 20,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.command = command
        self.image = image
        self.job_resources = offload.Resources(gpus=gpus, cpus=cpus, memory=memory, walltime=walltime,
                                           partition=partition, account=account, qos=qos)  # fmt: skip
        self.env = dict(env or {})
        self.secrets = dict(secrets or {})
        self.mounts = list(mounts or [])
        self.workdir = workdir
        self.site = site
        self.offload_conn_id = offload_conn_id
        self.job_name = job_name
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.log_tail_lines = log_tail_lines
        self._job: offload.Job | None = None

    # -- what to run ------------------------------------------------------------------------------------

    @property
    def hook(self) -> OffloadHook:
        return OffloadHook(offload_conn_id=self.offload_conn_id, site=self.site)

    def job_files(self, context: Any) -> dict[str, bytes]:
        """Files staged into the job's directory with the submission (the TaskFlow decorator's input)."""
        return {}

    def build_spec(self, context: Any) -> offload.JobSpec:
        command = [self.command] if isinstance(self.command, str) else list(self.command)
        return offload.JobSpec(
            command=[str(a) for a in command], image=self.image, resources=self.job_resources,
            env={k: str(v) for k, v in self.env.items()}, secrets=self.secrets, mounts=self.mounts,
            workdir=self.workdir, name=self.job_name or deterministic_name(context, self.task_id),
            files=self.job_files(context),
        )  # fmt: skip

    # -- running ----------------------------------------------------------------------------------------

    def execute(self, context: Any) -> Any:
        try:
            spec = self.build_spec(context)
            site = self.hook.get_site()
            site.validate(spec)
            job = self._reattach_or_submit(site, spec)
        except offload.OffloadError as exc:
            raise AirflowException(str(exc)) from None
        self._job = job
        context["ti"].xcom_push(key="job_id", value=job.id)
        if self.deferrable:
            status = job.status()
            if not status.state.is_terminal:
                self.defer(
                    trigger=OffloadJobTrigger(
                        job_id=job.id,
                        jobdir=job.ref.jobdir,
                        index=job.ref.index,
                        site=self.site,
                        offload_conn_id=self.offload_conn_id,
                        poll_interval=self.poll_interval,
                    ),
                    method_name="execute_complete",
                )
        last = ""
        for line in job.logs(follow=True):
            self.log.info("%s", line)
            last = line or last
        return self._finish(context, job, job.wait(), last)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        """Resume after the trigger saw the job end: fetch its log into the task log, then finish."""
        if event.get("error"):
            raise AirflowException(f"waiting for job {event.get('job_id')} failed: {event['error']}")
        site = self.hook.get_site()
        job = site.job(event["job_id"], jobdir=event["jobdir"], index=event.get("index"))
        self._job = job
        last = ""
        for line in job.logs():
            self.log.info("%s", line)
            last = line or last
        return self._finish(context, job, job.status(), last)

    def _reattach_or_submit(self, site: offload.Site, spec: offload.JobSpec) -> offload.Job:
        # Only a job still queued or running is taken over: one that ended (even successfully) is not reused,
        # so a retry or a cleared task does the work again, as Airflow users expect.
        for job in site.find(spec.name or ""):
            status = job.status()
            if not status.state.is_terminal:
                self.log.info("Reattaching to job %s (%s), left by an earlier try", job.id, status.describe())
                return job
        job = site.submit(spec)
        self.log.info("Submitted job %s to site %s (directory %s)", job.id, site.name, job.ref.jobdir)
        return job

    def _finish(self, context: Any, job: offload.Job, status: offload.JobStatus, last_line: str) -> Any:
        ti = context["ti"]
        ti.xcom_push(key="state", value=status.state.value)
        ti.xcom_push(key="exit_code", value=status.exit_code)
        if status.state is not offload.JobState.COMPLETED:
            lines = job.tail(self.log_tail_lines)
            raise AirflowException(f"job {job.id} ended {status.describe()}. Last lines of its log:\n{lines}")
        return self.result(job, last_line)

    def result(self, job: offload.Job, last_line: str) -> Any:
        """The task's return value (XCom): the last line of the job's output."""
        return last_line

    def on_kill(self) -> None:
        if self._job is not None:
            self.log.info("Task killed: cancelling job %s", self._job.id)
            self._job.cancel()


def deterministic_name(context: Any, task_id: str) -> str:
    """The same for every try of one task instance (dag, task, run, map index), unique across them."""
    ti = context["ti"]
    key = f"{ti.dag_id}|{ti.task_id}|{ti.run_id}|{getattr(ti, 'map_index', -1)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", task_id)[:40].strip("-.") or "task"
    return f"{stem}-{digest}"
