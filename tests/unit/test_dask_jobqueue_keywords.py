"""dask-jobqueue keywords OffloadCluster takes with their meaning: job_script_epilogue, job_name, protocol,
silence_logs, and --preload in worker_extra_args. Each test names what of dask-jobqueue it mirrors."""

from __future__ import annotations

import inspect
import json
import shlex
import subprocess
import time

import dask
import pytest

import offload
from dask_offload import OffloadCluster, options


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    """A remote SLURM site (only rendered against, never reached) and the local site, in their own dirs."""
    (tmp_path / "sites.toml").write_text(
        "[sites.hpc]\nhost = 'login.invalid'\nscheduler = 'slurm'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'cpu'\nworkdir = '/w'\nshebang = '#!/bin/bash -l'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))


def script(**keywords) -> str:
    with OffloadCluster(site="hpc", scheduler="local", **keywords) as cluster:
        return cluster.job_script()


def payload(text: str) -> list[str]:
    """The argv a rendered job runs in its container (the launcher's source spans many lines of the script)."""
    start = text.rindex("\n", 0, text.index("apptainer exec")) + 1
    return shlex.split(text[start : text.rindex("\noffload_status=$?")])


def worker_options(text: str) -> dict:
    """The options each worker of a rendered job gets (the launcher's last argument)."""
    return json.loads(payload(text)[-1])


def _given(**keywords):
    names = [p for p in inspect.signature(OffloadCluster.__init__).parameters
             if p not in ("self", "kwargs", "asynchronous", "loop", "security")]  # fmt: skip
    return {name: keywords.get(name) for name in names}


def test_job_name_names_the_clusters_jobs():
    """Mirrors dask_jobqueue.slurm.SLURMJob: job_name is the job's #SBATCH -J (config key jobqueue.slurm.name)."""
    text = script(job_name="my-analysis", name="cl")
    assert "#SBATCH --job-name=my-analysis" in text
    with dask.config.set({"jobqueue.slurm.name": "from-jobqueue"}):
        assert "#SBATCH --job-name=from-jobqueue" in script()


def test_protocol_is_tls_or_refused_with_the_reason():
    """Mirrors JobQueueCluster(protocol=...): the scheduler's and workers' protocol."""
    for protocol in ("tls://", "tls"):
        assert "--job-name=" in script(protocol=protocol)
    for protocol in ("tcp://", "ucx://", "ws"):
        with pytest.raises(offload.ConfigError, match="TLS"):
            script(protocol=protocol)
    with pytest.raises(offload.ConfigError, match="tls=False"):
        script(protocol="tls://", tls=False)


def test_silence_logs_is_the_log_level_of_scheduler_and_workers():
    """Mirrors JobQueueCluster(silence_logs="error"): a log level name."""
    assert worker_options(script(silence_logs="error"))["log_level"] == "ERROR"
    o = options.resolve(_given(silence_logs="warning"), {}, None)
    assert o.scheduler["log_level"] == "WARNING"
    assert "log_level" not in worker_options(script())  # not given: distributed's own levels
    with pytest.raises(offload.ConfigError, match="log level"):
        script(silence_logs="loud")


def test_preload_in_worker_extra_args_is_the_workers_preload():
    """Mirrors `dask worker --preload MODULE` (worker_extra_args are dask worker's command line options)."""
    assert options.worker_args(["--preload", "a", "--preload=b.py"]) == {"preload": ["a", "b.py"]}
    assert worker_options(script(worker_extra_args=["--preload", "mymod"]))["worker_kwargs"] == {"preload": ["mymod"]}


def test_epilogue_lines_run_after_the_workers_end_keeping_their_exit_code(tmp_path):
    """Mirrors Job.job_script: job_script_prologue, the worker command, then job_script_epilogue lines."""
    marker = tmp_path / "it's done"
    text = script(job_script_epilogue=[f"echo epilogue > {shlex.quote(str(marker))}", "echo second"])
    command = payload(text)
    shell = command.index("/bin/sh")
    program, launcher_args = command[shell + 2], command[shell + 4 :]
    assert launcher_args[:2] == ["python3", "-c"]  # the workers' command, as it was, given to the shell as "$@"
    # The wrapper, run with a stand-in for the workers that fails: the epilogue runs, the job keeps its code.
    result = subprocess.run(["/bin/sh", "-c", program, "sh", "sh", "-c", "echo worker; exit 7"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 7 and result.stdout == "worker\nsecond\n"
    assert marker.read_text() == "epilogue\n"


def test_epilogue_preload_and_log_level_on_real_workers(tmp_path):
    """The same on the local site: a real worker that loads a preload file (which notes the level of its
    distributed logger) and ends by --lifetime, after which its job runs the epilogue."""
    (tmp_path / "setup_worker.py").write_text(
        "import logging, pathlib\n"
        "def dask_setup(worker):\n"
        f"    pathlib.Path({str(tmp_path / 'preloaded')!r}).write_text(\n"
        "        logging.getLevelName(logging.getLogger('distributed').level))\n"
    )
    marker = tmp_path / "ended"
    with OffloadCluster(site="local", n_workers=1, memory="1GiB", job_script_epilogue=[f"touch {marker}"],
                        worker_extra_args=["--preload", str(tmp_path / "setup_worker.py"), "--lifetime", "3s"],
                        silence_logs="warning"):  # fmt: skip
        deadline = time.monotonic() + 90
        while not marker.exists():
            assert time.monotonic() < deadline, "the epilogue did not run after the worker's lifetime"
            time.sleep(0.2)
    assert (tmp_path / "preloaded").read_text() == "WARNING"
