"""Nothing a test starts outlives it: no job of the site user, no process.

A test that fails half-way must not leave a job holding GPUs or a client process serving a forward: on a
2-core site with 4 GPUs, one leftover starves the tests after it and their failures hide the first one. So:

* ``guard`` (an autouse fixture per test) notes the site user's queued jobs and this run's processes before the
  test; afterwards it gives what the test started a short grace to end, then cancels/stops the rest and fails
  the test, naming each job and process. A test that passed but left something behind fails too.
* ``check_session`` (``pytest_sessionfinish``) fails the run if anything of the run is still there.

This run's processes are told apart by an environment variable every process it starts inherits
(``OFFLOAD_TEST_RUN``), so a process that detached itself (a new session, reparented to init) is still found.
Jobs are read and cancelled with SLURM's own ``squeue``/``scancel`` as root, never through offload.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
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


def site_jobs(user: str) -> dict[str, str]:
    """The user's jobs that are not over, as ``{id: "id name state"}``, read with SLURM's own squeue."""
    if shutil.which("squeue") is None:
        return {}
    argv = ["squeue", "--noheader", "--array", f"--user={user}", f"--states={LIVE_STATES}", "--format=%i %j %T %M"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return {}  # no slurmctld (a fault test stopped it): nothing to read, and nothing it would run
    return {line.split()[0]: line.strip() for line in result.stdout.splitlines() if line.strip()}


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


def _cancel(user: str, jobs: list[str]) -> None:
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and set(jobs) & set(site_jobs(user)):
            time.sleep(0.5)


def leftovers(
    user: str | None, jobs_before: set[str], procs_before: dict[int, Proc], per_test: bool = True
) -> tuple[list[str], list[Proc]]:
    """What appeared since the snapshot and is still there after the grace: jobs, and processes the test itself
    started (a child of a process that was there before, such as a fixture's server, belongs to that one)."""
    deadline = time.monotonic() + GRACE
    while True:
        jobs = {j: line for j, line in (site_jobs(user) if user else {}).items() if j not in jobs_before}
        now = run_processes()
        new = {pid: p for pid, p in now.items() if not _was_there(procs_before, p)}
        owned = {pid: p for pid, p in new.items() if p.ppid not in now or not _was_there(procs_before, now[p.ppid])}
        if per_test:  # a fixture's own process is the fixture's to stop
            owned = {pid: p for pid, p in owned.items() if not p.fixture}
        if (not jobs and not owned) or time.monotonic() >= deadline:
            return sorted(jobs.values()), sorted(owned.values(), key=lambda p: p.pid)
        time.sleep(0.5)


def clean_up(user: str | None, jobs: list[str], procs: list[Proc]) -> str:
    """Stop the processes (which cancels their jobs where they can), cancel what is left; say what it was."""
    _stop(procs)
    if user:
        _cancel(user, [line.split()[0] for line in jobs])
    lines = [f"  job {line}" for line in jobs] + [f"  process {p}" for p in procs]
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
