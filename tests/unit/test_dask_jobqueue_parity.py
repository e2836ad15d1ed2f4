"""OffloadCluster beside dask-jobqueue's SLURMCluster, the peer whose keywords it takes: each test builds its
input as dask-jobqueue's code or config does and names what it mirrors.

* ``processes``, when not given, comes from ``cores`` as SLURMCluster derives it (distributed's
  ``nprocesses_nthreads``), checked against a real SLURMCluster;
* only what the user set in the Dask config counts: dask-jobqueue's package defaults, which its import registers
  (``dask.config.update_defaults``), are not the user's; offload registers its own;
* the keywords job_script_epilogue, job_name, protocol, silence_logs and ``--preload`` in worker_extra_args;
* dask-jobqueue is a peer of the tests and benchmarks, not a dependency of ``offload[dask]``;
* a scheduler in the client's process (``scheduler="local"``) on a site whose nodes cannot reach the client is
  refused before any worker is submitted; on the local site it runs.
"""

from __future__ import annotations

import copy
import inspect
import json
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import dask
import pytest
import yaml
from distributed import Client

import offload
from dask_offload import OffloadCluster, options

ROOT = Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def profiles(tmp_path, monkeypatch):
    """A remote SLURM site (only rendered against, never reached) and the local site, in their own dirs."""
    (tmp_path / "sites.toml").write_text(
        "[sites.hpc]\nhost = 'login.invalid'\nscheduler = 'slurm'\nruntime = 'apptainer'\nimage = '/img.sif'\n"
        "partition = 'cpu'\nworkdir = '/w'\nshebang = '#!/bin/bash -l'\n"
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))


@pytest.fixture
def dask_jobqueue(tmp_path, monkeypatch):
    """dask-jobqueue, imported as a user's program imports it. Its import copies jobqueue.yaml into the user's
    Dask config dir (dask.config.ensure_file): here a temporary one, not the home of whoever runs the tests."""
    monkeypatch.setattr(dask.config, "PATH", str(tmp_path / "dask"))
    return pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is the peer these tests compare with")


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


def test_processes_default_from_cores_as_slurmcluster_derives_it(dask_jobqueue):
    """Mirrors dask_jobqueue.core.Job.__init__: no processes given -> nprocesses_nthreads(cores)."""
    with dask_jobqueue.SLURMCluster(cores=8, memory="8GB", scheduler_options={"dashboard_address": ":0"}) as theirs:
        their_script = theirs.job_script()
        their_job = theirs._dummy_job  # the job every worker job is made like (what job_script renders)
        expected = (their_job.worker_processes, their_job.worker_process_threads)
    assert f"--nworkers {expected[0]}" in their_script and f"--nthreads {expected[1]}" in their_script
    assert expected == (4, 2)  # sqrt(8) ~ 2.8: 4 processes of 2 threads

    with OffloadCluster(site="hpc", scheduler="local", cores=8, memory="8GB") as ours:
        assert (ours.workers_per_job, ours._threads_per_worker()) == expected
        given = worker_options(ours.job_script())
    assert given["nthreads"] == expected[1] and given["memory_limit"] == 8_000_000_000 // expected[0]


def test_processes_from_the_config_still_win_over_the_derived_number():
    with dask.config.set({"offload.processes": 2}):
        assert options.resolve(_given(cores=8), {}, None).per_job == 2
    assert options.resolve(_given(cores=8, processes=1), {}, None).per_job == 1
    assert options.resolve(_given(), {}, None).per_job == 1  # nothing given: one worker of one thread


def script(**keywords) -> str:
    with OffloadCluster(site="hpc", scheduler="local", **keywords) as cluster:
        return cluster.job_script()


def test_importing_dask_jobqueue_does_not_change_offloads_jobs(dask_jobqueue):
    """Mirrors dask_jobqueue.config.reconfigure: dask.config.update_defaults(jobqueue.yaml) on import."""
    assert dask.config.get("jobqueue.slurm.shebang") == "#!/usr/bin/env bash"  # registered, as on import
    text = script()
    assert text.splitlines()[0] == "#!/bin/bash -l"  # the site's login shell, so `module` works
    assert "#SBATCH --time=01:00:00" in text  # offload's walltime, not jobqueue's 30 minutes


def test_jobqueue_defaults_registered_again_are_still_not_the_users(dask_jobqueue):
    """The same as reconfigure() does, run again (as a second import of its config module would)."""
    path = Path(dask_jobqueue.__file__).with_name("jobqueue.yaml")
    defaults = yaml.safe_load(path.read_text())
    saved = (list(dask.config.defaults), copy.deepcopy(dask.config.config))
    try:
        dask.config.update_defaults(defaults)
        assert options.config("walltime") == "01:00:00" and options.config("shebang") is None
    finally:
        dask.config.defaults[:] = saved[0]
        dask.config.config.clear()
        dask.config.config.update(saved[1])


def test_what_the_user_sets_for_jobqueue_still_carries_over(dask_jobqueue, monkeypatch):
    """The user's settings, in dask's three ways: DASK_* variables, yaml files (collected with them), set()."""
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__WALLTIME", "02:00:00")
    # A user who writes down jobqueue's own default has still chosen it: it counts.
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__SHEBANG", "#!/usr/bin/env bash")
    dask.config.refresh()
    try:
        text = script()
        assert "#SBATCH --time=02:00:00" in text and text.splitlines()[0] == "#!/usr/bin/env bash"
        with dask.config.set({"jobqueue.slurm.walltime": "03:00:00"}):
            assert "#SBATCH --time=03:00:00" in script()
    finally:
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__WALLTIME")
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__SHEBANG")
        dask.config.refresh()


def test_offloads_defaults_are_registered_and_the_users_offload_section_wins(monkeypatch):
    """Mirrors dask_jobqueue.config.reconfigure for offload's own section: its defaults are in Dask's config."""
    assert dask.config.get("offload.walltime") == "01:00:00" and dask.config.get("offload.scheduler_cores") == 1
    assert any("offload" in registered for registered in dask.config.defaults)
    # The user's offload value wins over the user's jobqueue value, even when it equals offload's default.
    monkeypatch.setenv("DASK_OFFLOAD__WALLTIME", "01:00:00")
    monkeypatch.setenv("DASK_JOBQUEUE__SLURM__WALLTIME", "02:00:00")
    dask.config.refresh()
    try:
        assert options.config("walltime") == "01:00:00"
    finally:
        monkeypatch.delenv("DASK_OFFLOAD__WALLTIME")
        monkeypatch.delenv("DASK_JOBQUEUE__SLURM__WALLTIME")
        dask.config.refresh()
    assert options.config("walltime") == "01:00:00"  # nothing set: offload's default


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


def test_the_dask_extra_does_not_install_dask_jobqueue():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not [r for r in extras["dask"] if r.startswith("dask-jobqueue")]
    code = ("import sys; sys.modules['dask_jobqueue'] = None\n"
            "from dask_offload import OffloadCluster\n"
            "with OffloadCluster(site='hpc', scheduler='local', cores=2) as c: print(c.job_script()[:2])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_local_scheduler_on_a_remote_site_is_refused_before_any_worker_is_submitted():
    """Mirrors JobQueueCluster.__init__, whose scheduler always runs in the client's process (its login-node
    setting), with workers asked for as dask-jobqueue asks: n_workers=, scale(), adapt()."""
    with pytest.raises(offload.ConfigError, match="scheduler='site'"):
        OffloadCluster(site="hpc", scheduler="local", n_workers=1)
    with OffloadCluster(site="hpc", scheduler="local") as cluster:  # no worker: job_script() still renders
        with pytest.raises(offload.ConfigError, match="cannot reach"):
            cluster.scale(2)
        with pytest.raises(offload.ConfigError, match="cannot reach"):
            cluster.adapt(minimum=0, maximum=4)
        assert cluster.jobs == []


def test_a_local_scheduler_on_the_local_site_still_runs_workers():
    with OffloadCluster(site="local", scheduler="local", n_workers=1, memory="1GiB") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=60)
