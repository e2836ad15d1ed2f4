"""The worker side of a Dask job (dask_offload/launcher.py), run as it runs in a job: a plain Python program."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

pytest.importorskip("distributed")

from dask_offload import launcher

WAIT = textwrap.dedent("""
    import sys
    from dask_offload import launcher
    print(launcher.scheduler_address("file", float(sys.argv[1]) if sys.argv[1] != "none" else None))
""")


def test_pre_submitted_workers_end_after_death_timeout_when_no_address_comes(tmp_path):
    """The client died before it wrote scheduler.json: the workers' job ends instead of waiting forever."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", WAIT, "1"], env={"OFFLOAD_JOB_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 3
    assert f"{launcher.MARK}_ERROR no scheduler address after death_timeout=1.0 s" in result.stdout
    assert time.monotonic() - started < 20


def test_the_address_is_read_once_the_client_writes_it(tmp_path):
    (tmp_path / "scheduler.json").write_text(json.dumps({"address": "tls://127.0.0.1:8786"}))
    result = subprocess.run([sys.executable, "-c", WAIT, "none"], env={"OFFLOAD_JOB_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "tls://127.0.0.1:8786"


def test_workers_get_the_nannys_environment_and_the_jobs_own_values_win(monkeypatch):
    """What distributed's Nanny sets for its worker processes (one BLAS thread, a fixed hash seed) reaches offload's
    forked workers: start-time variables in the job's environment, the rest set by the launcher before its import."""
    from dask_offload.cluster import AT_START, worker_environ

    environ = worker_environ()
    assert environ["PYTHONHASHSEED"] == "6640" and environ["OPENBLAS_NUM_THREADS"] == "1"
    assert set(AT_START) <= set(environ)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # e.g. set by the site for the job: kept, as the Nanny keeps it
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    launcher.set_worker_environ(environ)
    assert os.environ["OMP_NUM_THREADS"] == "8" and os.environ["OPENBLAS_NUM_THREADS"] == "1"


DEFERRED = textwrap.dedent("""
    import asyncio, gc, importlib.util, sys

    spec = importlib.util.spec_from_file_location("launcher", sys.argv[1])  # as a job has it: not via dask_offload
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.import_distributed()
    from distributed import Client, Scheduler, Worker
    from distributed.protocol import utils

    assert "numpy" not in sys.modules and isinstance(utils.numpy, launcher.NumpyOnFirstUse)
    assert gc.isenabled() and gc.get_freeze_count() > 0
    small = utils.host_array(1000)
    assert small.nbytes == 1000 and not small.readonly and "numpy" not in sys.modules

    async def main():
        async with Scheduler(dashboard_address=":0", host="127.0.0.1") as s, Worker(s.address, nthreads=1):
            async with Client(s.address, asynchronous=True) as client:
                assert await client.submit(sum, [1, 2]) == 3
                print("registered and ran a task; numpy imported:", "numpy" in sys.modules)
                big = await client.scatter(b"x" * (4 << 20))  # a large message: read into numpy's buffer
                assert await client.submit(len, big) == 4 << 20
        import numpy

        assert not isinstance(numpy, launcher.NumpyOnFirstUse) and sys.modules["numpy"] is numpy
        assert isinstance(utils.host_array(1 << 20).obj, numpy.ndarray)

    asyncio.run(main())
""")


def test_a_job_imports_numpy_only_when_distributed_first_needs_it():
    """issue 30: numpy is a third of the job's import CPU, and a worker needs it for neither its registration nor
    small messages. Run as a job runs: a fresh interpreter with distributed imported by the launcher."""
    argv = [sys.executable, "-c", DEFERRED, launcher.__file__]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered and ran a task; numpy imported: False" in result.stdout
