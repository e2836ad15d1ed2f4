"""Nothing a test starts outlives it: no job of the site user, no process.

A test that fails half-way must not leave a job holding GPUs or a client process serving a forward: on a
2-core site with 4 GPUs, one leftover starves the tests after it and their failures hide the first one. So:

* ``guard`` (an autouse fixture per test) notes the site user's queued jobs and this run's processes before the
  test; afterwards it gives what the test started a short grace to end, then cancels/stops the rest and fails
  the test, naming each job and process. A test that passed but left something behind fails too.
* ``check_session`` (``pytest_sessionfinish``) fails the run if anything of the run is still there.

This run's processes are told apart by an environment variable every process it starts inherits
(``OFFLOAD_TEST_RUN``), so a process that detached itself (a new session, reparented to init) is still found.
Jobs are read and cancelled with the schedulers' own tools as root, never through offload: SLURM's
``squeue``/``scancel`` and Grid Engine's ``qstat``/``qdel`` (the test site runs both, for the same user). A Grid
Engine job's key is ``ge:NUMBER``, since both number their jobs from 1; a job of the test site's second SLURM
cluster is keyed ``second:ID`` for the same reason (read and cancelled with that cluster's ``SLURM_CONF``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

RUN_MARK = "OFFLOAD_TEST_RUN"
# A process a fixture owns across tests (a server a test may restart) carries this too: the per-test check leaves
# it to its fixture, the end of the run does not.
FIXTURE_MARK = "OFFLOAD_TEST_FIXTURE"
os.environ.setdefault(RUN_MARK, uuid.uuid4().hex)
_MARK = f"{RUN_MARK}={os.environ[RUN_MARK]}".encode()
GRACE = 15.0  # seconds a job or process gets to end by itself after its test (a cancel takes a few)
LIVE_STATES = "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED,REQUEUED,RESIZING,SIGNALING,STAGE_OUT"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    started: int  # clock ticks since boot: a pid reused later is another process
    cmdline: str
    fixture: bool = False  # started with FIXTURE_MARK: its fixture stops it

    def __str__(self) -> str:
        return f"pid {self.pid}: {self.cmdline[:200]}"


def _stat(pid: int) -> tuple[str, int, int] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[19])  # state, ppid, starttime


def run_processes() -> dict[int, Proc]:
    """Live processes (not zombies) that carry this run's mark, except this pytest process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if _MARK not in environ:
                continue
            fixture = any(v.startswith(FIXTURE_MARK.encode() + b"=") for v in environ)
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[0] in ("Z", "X"):
            continue
        found[int(entry.name)] = Proc(int(entry.name), stat[1], stat[2], cmdline, fixture)
    return found


@dataclass(frozen=True, order=True)
class SiteJob:
    key: str  # SLURM's job id (an array task's as 12_3); a Grid Engine job's number as ge:NUMBER
    name: str
    state: str  # the scheduler's own word: RUNNING, PENDING...; r, qw, dr... (an array's, one per task group)
    running: bool  # it runs (a Grid Engine array: one of its tasks does)

    def __str__(self) -> str:
        return f"{self.key} {self.name} {self.state}"


def site_jobs(user: str) -> dict[str, SiteJob]:
    """The user's jobs that are not over, on either scheduler, by key: SLURM's by their id, Grid Engine's as
    ``ge:NUMBER`` (both number from 1)."""
    return {**_slurm_jobs(user), **_gridengine_jobs(user), **_second_cluster_jobs(user)}


def _slurm_jobs(user: str) -> dict[str, SiteJob]:
    """Read with SLURM's own squeue, one job per array task."""
    if shutil.which("squeue") is None:
        return {}
    argv = ["squeue", "--noheader", "--array", f"--user={user}", f"--states={LIVE_STATES}", "--format=%i %j %T %M"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return {}  # no slurmctld (a fault test stopped it): nothing to read, and nothing it would run
    found = {}
    for line in result.stdout.splitlines():
        if line.strip():
            key, name, state, elapsed = line.split()
            found[key] = SiteJob(key, name, f"{state} {elapsed}", state == "RUNNING")
    return found


# The test site's Grid Engine cell (scripts/testsite-gridengine), and the mark of its jobs' keys
GE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}
GE_PREFIX = "ge:"
GE_RUNNING = ("r", "t", "Rr", "Rt")  # qstat's states of a job that runs (or is being started), not being deleted


def _gridengine_jobs(user: str) -> dict[str, SiteJob]:
    """Read with Grid Engine's own ``qstat -xml`` (its plain output cuts names to 10 characters), one job per job
    number: an array's tasks, running or pending, are one job to qdel."""
    if shutil.which("qstat") is None:
        return {}
    argv = ["qstat", "-u", user, "-xml"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **GE_ENV})
    if result.returncode != 0 or not result.stdout.strip():
        return {}  # no qmaster (the cell is down): nothing to read, and nothing it would run
    found: dict[str, SiteJob] = {}
    for entry in ET.fromstring(result.stdout).iter("job_list"):
        key = GE_PREFIX + entry.findtext("JB_job_number", "").strip()
        letters = entry.findtext("state", "").strip()
        tasks = entry.findtext("tasks")
        state = f"{letters}[{tasks}]" if tasks else letters
        if key in found:  # another group of the array's tasks
            job = found[key]
            found[key] = SiteJob(key, job.name, f"{job.state},{state}", job.running or letters in GE_RUNNING)
        else:
            found[key] = SiteJob(key, entry.findtext("JB_name", "").strip(), state, letters in GE_RUNNING)
    return found


def _stop(procs: list[Proc]) -> None:
    """SIGINT first (offload's CLI cancels its job on Ctrl-C), then SIGTERM, then SIGKILL."""
    for sig, wait in ((signal.SIGINT, 20.0), (signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if _same(p)]
        if not alive:
            return
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(_same(p) for p in alive):
            time.sleep(0.2)


def _was_there(before: dict[int, Proc], p: Proc) -> bool:
    return p.pid in before and before[p.pid].started == p.started


def _same(p: Proc) -> bool:
    stat = _stat(p.pid)
    return stat is not None and stat[0] not in ("Z", "X") and stat[2] == p.started


def cancel(user: str, jobs: list[str]) -> None:
    """Cancel these jobs (keys of :func:`site_jobs`) with their scheduler's own tool; wait (30 s at most) until they
    are gone."""
    slurm = [j for j in jobs if not j.startswith((GE_PREFIX, SECOND_PREFIX))]
    gridengine = [j.removeprefix(GE_PREFIX) for j in jobs if j.startswith(GE_PREFIX)]
    if slurm:
        subprocess.run(["scancel", *slurm], capture_output=True, timeout=60)
    if gridengine:
        subprocess.run(["qdel", *gridengine], capture_output=True, timeout=60, env={**os.environ, **GE_ENV})
    _cancel_second_cluster(jobs)
    if jobs:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(jobs) & set(site_jobs(user)):
            time.sleep(0.5)


def leftovers(
    user: str | None, jobs_before: set[str], procs_before: dict[int, Proc], per_test: bool = True
) -> tuple[list[SiteJob], list[Proc]]:
    """What appeared since the snapshot and is still there after the grace: jobs, and processes the test itself
    started (a child of a process that was there before, such as a fixture's server, belongs to that one)."""
    deadline = time.monotonic() + GRACE
    while True:
        jobs = {key: job for key, job in (site_jobs(user) if user else {}).items() if key not in jobs_before}
        now = run_processes()
        new = {pid: p for pid, p in now.items() if not _was_there(procs_before, p)}
        owned = {pid: p for pid, p in new.items() if p.ppid not in now or not _was_there(procs_before, now[p.ppid])}
        if per_test:  # a fixture's own process is the fixture's to stop
            owned = {pid: p for pid, p in owned.items() if not p.fixture}
        if (not jobs and not owned) or time.monotonic() >= deadline:
            return sorted(jobs.values()), sorted(owned.values(), key=lambda p: p.pid)
        time.sleep(0.5)


def clean_up(user: str | None, jobs: list[SiteJob], procs: list[Proc]) -> str:
    """Stop the processes (which cancels their jobs where they can), cancel what is left; say what it was."""
    _stop(procs)
    if user:
        cancel(user, [job.key for job in jobs])
    lines = [f"  job {job}" for job in jobs] + [f"  process {p}" for p in procs]
    return "\n".join(lines)


def site_user(config: Path) -> str | None:
    """The test site profile's cluster user, or None where there is no site."""
    import tomllib

    try:
        return tomllib.loads(config.read_text())["sites"]["testsite"]["user"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None


def guard(nodeid: str, user: str | None):
    """The body of a per-test autouse fixture: yields once; fails the test, after cleaning up, if it left a job or
    a process behind."""
    import pytest

    jobs_before = set(site_jobs(user)) if user else set()
    procs_before = run_processes()
    yield
    jobs, procs = leftovers(user, jobs_before, procs_before)
    if jobs or procs:
        left = clean_up(user, jobs, procs)
        pytest.fail(f"{nodeid} left these behind (now cancelled/stopped):\n{left}", pytrace=False)


def check_session(session, user: str | None) -> None:
    """For ``pytest_sessionfinish``: the whole run leaves nothing behind, else it fails, naming what it was."""
    jobs, procs = leftovers(user, set(), {}, per_test=False)
    if jobs or procs:
        left = clean_up(user, jobs, procs)
        session.config.get_terminal_writer().line(f"\nLEFT BEHIND by this run (now cleaned up):\n{left}", red=True)
        session.exitstatus = 1


# The test site's second SLURM cluster (scripts/testsite-slurm2): its own slurmctld, found through its own
# slurm.conf; its job ids start at 1 as the first's do, so its jobs' keys are second:ID.
SECOND_ENV = {"SLURM_CONF": "/etc/slurm-second/slurm.conf"}
SECOND_PREFIX = "second:"


def _second_cluster_jobs(user: str) -> dict[str, SiteJob]:
    """Read with the second cluster's own squeue, one job per array task."""
    if shutil.which("squeue") is None or not os.path.exists(SECOND_ENV["SLURM_CONF"]):
        return {}
    argv = ["squeue", "--noheader", "--array", f"--user={user}", f"--states={LIVE_STATES}", "--format=%i %j %T %M"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={**os.environ, **SECOND_ENV})
    if result.returncode != 0:
        return {}  # its slurmctld is down: nothing to read, and nothing it would run
    found = {}
    for line in result.stdout.splitlines():
        if line.strip():
            job_id, name, state, elapsed = line.split()
            key = SECOND_PREFIX + job_id
            found[key] = SiteJob(key, name, f"{state} {elapsed}", state == "RUNNING")
    return found


def _cancel_second_cluster(jobs: list[str]) -> None:
    """scancel, on the second cluster, of the keys of :func:`site_jobs` that are its jobs."""
    ids = [j.removeprefix(SECOND_PREFIX) for j in jobs if j.startswith(SECOND_PREFIX)]
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=60, env={**os.environ, **SECOND_ENV})
