"""processes, when not given, is derived from cores as dask-jobqueue's SLURMCluster derives it (distributed's
nprocesses_nthreads): the same workers x threads for the same keywords. Checked against a real SLURMCluster,
which constructing does not submit anything."""

from __future__ import annotations

import inspect
import json
import shlex

import dask
import pytest

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
