"""The Grid Engine plugin on a real Grid Engine (``scripts/testsite-gridengine up``): Debian's sge_qmaster on this
machine, two sge_execd in network namespaces, reached over the test site's real sshd; jobs run in the site's
default Charliecloud image. Nothing is stubbed.

Without $STATE/offload-gridengine.toml these tests skip (fail under CI=true). They create no SLURM job, so the
suite's SLURM leftover guard is replaced here by a Grid Engine one: every test qdel's its jobs in ``finally``,
and a job of the user's left in qstat after a test fails it (after qdel)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

STATE = Path(os.environ.get("OFFLOAD_TESTSITE_DIR", "/var/lib/offload-testsite"))
CONFIG = Path(os.environ.get("OFFLOAD_GRIDENGINE_CONFIG", STATE / "offload-gridengine.toml"))
SCRIPT = Path(__file__).parents[2] / "scripts" / "testsite-gridengine"
USER = "hpcuser"


def _qstat_ids() -> set[str]:
    out = subprocess.run(["qstat", "-u", USER], capture_output=True, text=True, timeout=60).stdout
    return {line.split()[0] for line in out.splitlines()[2:] if line.strip()}


@pytest.fixture(scope="session")
def testsite_config():
    """Overrides the suite's: this file needs the Grid Engine cell, not the SLURM site's status."""
    env = {**os.environ, "OFFLOAD_TESTSITE_DIR": str(CONFIG.parent)}
    up = CONFIG.exists() and subprocess.run([str(SCRIPT), "status"], capture_output=True, env=env).returncode == 0
    if not up:
        message = f"Grid Engine is not up ({CONFIG}): run 'scripts/testsite-gridengine up' as root"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CONFIG


@pytest.fixture(autouse=True)
def leftovers_guard(testsite_config):
    """Overrides the suite's SLURM guard (these tests submit no SLURM job, and must not cancel another run's):
    a Grid Engine job of the user's that appears during the test and outlives it fails the test, after qdel."""
    before = _qstat_ids()
    yield
    deadline = time.monotonic() + 15
    while (left := _qstat_ids() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        subprocess.run(["qdel", *sorted(left)], capture_output=True, timeout=60)
        pytest.fail(f"left Grid Engine jobs behind (now qdel'd): {sorted(left)}", pytrace=False)


@pytest.fixture
def site(testsite_config):
    from offload import load_profiles
    from offload.site import Site

    site = Site(load_profiles(CONFIG).get("gridengine"))
    yield site
    site.close()


def _qdel(jobs) -> None:
    ids = sorted({job.id.split(".")[0] for job in jobs})
    if ids:
        subprocess.run(["qdel", *ids], capture_output=True, timeout=60)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_a_job_in_the_container_prints_and_exits_with_its_code(site):
    from offload import JobSpec, JobState

    jobs = []
    try:
        code = (
            "import os, sys; print('hello', os.environ['OFFLOAD_JOB_DIR'], open('/etc/os-release').read()[:40]); "
            "sys.exit(3)"
        )
        jobs.append(job := site.submit(JobSpec(["python3", "-c", code], name=_name("ge-hello"))))
        status = job.wait(timeout=120)
        assert status.state is JobState.FAILED and status.exit_code == 3, status
        assert status.node in ("ge1", "ge2", "")  # "" when the exit code file told the end before qacct did
        log = "".join(job.logs())
        assert "hello /mnt/9" in log and "Debian" in log, log  # ch-run's job dir, in the image
    finally:
        _qdel(jobs)


def test_an_ended_job_s_state_comes_from_qacct(site):
    """Once qstat has forgotten it, the end is qacct's (the exit code file is removed to be sure)."""
    from offload import JobSpec, JobState
    from offload.jobs import JobRef

    jobs = []
    try:
        jobs.append(job := site.submit(JobSpec(["sh", "-c", "exit 5"], name=_name("ge-qacct"))))
        assert job.wait(timeout=120).exit_code == 5
        subprocess.run(["rm", "-f", job.ref.exitcode_path], check=True)
        from offload import _loop

        ref = JobRef(job.id, job.ref.jobdir)
        deadline = time.monotonic() + 60  # UNKNOWN until the accounting file is flushed (flush_time), not a guess
        while (status := _loop.run(site._scheduler.poll(site.transport, [ref]))[job.id]).state is JobState.UNKNOWN:
            assert time.monotonic() < deadline, status
            time.sleep(1)
        assert (status.state, status.exit_code) == (JobState.FAILED, 5), status
        accounted = subprocess.run(["qacct", "-j", job.id], capture_output=True, text=True).stdout
        assert "exit_status  5" in accounted
    finally:
        _qdel(jobs)


def test_gpus_are_requested_through_the_consumable(site):
    from offload import JobSpec, JobState, Resources

    jobs = []
    try:
        spec = JobSpec(["sh", "-c", "sleep 20"], name=_name("ge-gpu"), resources=Resources(gpus=2))
        jobs.append(first := site.submit(spec))
        jobs.append(second := site.submit(spec))
        jobs.append(third := site.submit(spec))  # 2 hosts x 2 GPUs: the third waits for GPUs
        script = subprocess.run(["cat", f"{first.ref.jobdir}/job.sh"], capture_output=True, text=True).stdout
        assert "#$ -l gpu=2" in script
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            states = [j.status().state for j in (first, second, third)]
            if states.count(JobState.RUNNING) == 2:
                break
            time.sleep(1)
        assert states.count(JobState.RUNNING) == 2 and JobState.PENDING in states, states
        info = subprocess.run(["qstat", "-j", third.id], capture_output=True, text=True).stdout
        assert "gpu" in info  # qstat -j says it waits for the gpu consumable
    finally:
        _qdel(jobs)


def test_an_array_runs_each_task_with_its_index(site):
    from offload import JobSpec, JobState

    jobs = []
    try:
        spec = JobSpec(["sh", "-c", 'echo task $OFFLOAD_TASK_INDEX; exit "$OFFLOAD_TASK_INDEX"'], name=_name("ge-arr"))
        jobs = site.submit_many([spec] * 3)
        assert len({job.id.split(".")[0] for job in jobs}) == 1, [job.id for job in jobs]  # one qsub -t 1-3
        statuses = [job.wait(timeout=120) for job in jobs]
        assert [s.exit_code for s in statuses] == [0, 1, 2]
        assert [s.state for s in statuses] == [JobState.COMPLETED, JobState.FAILED, JobState.FAILED]
        assert ["".join(job.logs()).strip() for job in jobs] == ["task 0", "task 1", "task 2"]
    finally:
        _qdel(jobs)


def test_cancel_a_running_and_a_pending_job(site):
    from offload import JobSpec, JobState, Resources

    jobs = []
    try:
        jobs.append(running := site.submit(JobSpec(["sleep", "300"], name=_name("ge-cancel"))))
        # more GPUs than any host has free while the others hold them: never starts
        jobs.append(pending := site.submit(JobSpec(["true"], name=_name("ge-never"),
                                                   resources=Resources(gpus=2, walltime="00:01:00",
                                                                       extra=("-h",)))))  # fmt: skip
        deadline = time.monotonic() + 60
        while running.status().state is not JobState.RUNNING:
            assert time.monotonic() < deadline, running.status()
            time.sleep(0.5)
        assert pending.status().state is JobState.PENDING
        site.cancel([running, pending])
        assert running.wait(timeout=60).state is JobState.CANCELLED
        assert pending.wait(timeout=60).state is JobState.CANCELLED
        assert not {running.id, pending.id} & _qstat_ids()
    finally:
        _qdel(jobs)


def test_find_by_name(site):
    from offload import JobSpec

    jobs = []
    try:
        name = _name("ge-find")
        jobs.append(job := site.submit(JobSpec(["sleep", "60"], name=name)))
        found = site.find(name)
        assert [(j.id, j.ref.jobdir) for j in found] == [(job.id, job.ref.jobdir)]
        assert site.find(_name("ge-nobody")) == []
    finally:
        _qdel(jobs)


def test_sites_gpus_lists_the_exec_hosts(testsite_config):
    env = {**os.environ, "OFFLOAD_CONFIG": str(CONFIG)}
    out = subprocess.run([sys.executable, "-m", "offload.cli", "sites", "gpus", "gridengine", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    import json

    report = json.loads(out.stdout)
    hosts = {node["name"]: node for node in report["nodes"]}
    assert set(hosts) == {"ge1", "ge2"}
    assert all(node["gpus"] == 2 and node["partitions"] == ["offload.q"] for node in hosts.values())
    assert report["partitions"]["offload.q"]["gpus"] == 4


def test_a_command_runs_inside_a_running_job(site):
    """What `offload shell` and reach relays use: qrsh -inherit into the job's host."""
    from offload import JobSpec, JobState, _loop

    jobs = []
    try:
        jobs.append(job := site.submit(JobSpec(["sleep", "120"], name=_name("ge-inherit"))))
        status = job.wait_for_state(JobState.RUNNING, timeout=60)
        command = ["sh", "-c", "echo in $JOB_ID on $(hostname) 'a  b'"]
        argv = _loop.run(site.scheduler.interactive(site.transport, job.ref, command, pty=False))
        result = _loop.run(site.transport.run(argv, check=False, timeout=60))
        assert result.stdout.strip() == f"in {job.id} on {status.node} a  b", (result.stdout, result.stderr)
    finally:
        _qdel(jobs)


def test_doctor_passes_with_grid_engines_own_checks(testsite_config):
    """The doctor knows no scheduler: Grid Engine's plugin names its commands and adds its checks."""
    env = {**os.environ, "OFFLOAD_CONFIG": str(CONFIG)}
    out = subprocess.run([sys.executable, "-m", "offload.cli", "doctor", "gridengine"], capture_output=True,
                         text=True, env=env, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("connection", "qsub", "qstat", "qacct", "parallel environment", "runtime"):
        assert any(line.startswith("PASS") and check in line for line in out.stdout.splitlines()), (check, out.stdout)
    assert "sbatch" not in out.stdout and "sacct" not in out.stdout


WHO = ("import os, socket; print('who', socket.gethostname(), os.environ['RANK'], os.environ['NODE_RANK'], "
       "os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])")  # fmt: skip


def test_a_job_on_two_hosts_runs_one_copy_on_each_through_the_parallel_environment(site):
    """Resources(nodes=2) is `-pe offload 2` (one slot per host); each copy is started with qrsh -inherit and
    told its rank and the first host, as srun's copies are on SLURM."""
    from offload import JobSpec, JobState, Resources

    jobs = []
    try:
        jobs.append(job := site.submit(JobSpec(["python3", "-c", WHO], resources=Resources(nodes=2),
                                               name=_name("ge-pe"))))  # fmt: skip
        status = job.wait(timeout=240)
        out = job.output().decode()
        assert status.state is JobState.COMPLETED, (status, out)
        rows = sorted((line.split("who ", 1)[1].split() for line in out.splitlines() if "who " in line),
                      key=lambda row: row[1])  # fmt: skip
        assert [row[1:4] for row in rows] == [["0", "0", "2"], ["1", "1", "2"]], out
        assert {row[0] for row in rows} == {"ge1", "ge2"} and len({row[4] for row in rows}) == 1, out
    finally:
        _qdel(jobs)


def test_a_dask_cluster_on_grid_engine(testsite_config, monkeypatch):
    """OffloadCluster(site=<a Grid Engine site>): the scheduler job and two worker jobs on the cell, over TLS
    through the one connection, as on SLURM."""
    import socket

    from dask.distributed import Client

    from dask_offload import OffloadCluster

    monkeypatch.setenv("OFFLOAD_CONFIG", str(CONFIG))
    name = _name("ge-dask")
    with OffloadCluster(site="gridengine", n_workers=2, processes=1, memory="1GiB", name=name) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=180)
            assert sum(client.gather(client.map(lambda x: x * x, range(10)))) == 285
            assert set(client.run(socket.gethostname).values()) <= {"ge1", "ge2"}
            assert cluster.scheduler_address.startswith("tls://127.0.0.1:")


def test_offload_jupyter_on_grid_engine(testsite_config):
    """``offload jupyter --site <a Grid Engine site>``: the server in a job on an exec host, on its loopback only,
    reached through the job's relay (a qrsh step), a cell run through the server's own API; Ctrl-C ends it."""
    import signal

    from .test_jupyter import run_cell

    env = {**os.environ, "OFFLOAD_CONFIG": str(CONFIG)}
    argv = [sys.executable, "-m", "offload.cli", "jupyter", "--site", "gridengine", "--gpus", "1", "--no-browser"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "/lab?token=" in url, proc.stderr.read()
        base, token = url.split("/lab?token=")
        code = "import os, socket; print(socket.gethostname(), os.environ.get('CUDA_VISIBLE_DEVICES'))"
        host, gpus = run_cell(base, token, code).split()
        assert host in ("ge1", "ge2") and len(gpus.split(",")) == 1, (host, gpus)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130), proc.returncode
