"""A submitted job: :class:`Job`, its :class:`JobState` and :class:`JobStatus`.

A Job is a handle: it holds the job's id and where its files are on the site, and asks the site's poller for
its state. Many Jobs waiting at once cost one scheduler query per poll interval, not one each.
Every operation has a sync form (the CLI, Airflow) and an async form prefixed with ``a`` (Dask, triggers),
which may be awaited from any loop; the async one is written, the sync one made from it (:mod:`offload._loop`).
The async wait is :meth:`Job.finished`. Whoever waits for a state (:meth:`Job.await_state`) or follows a file
the job writes (:meth:`Job.afollow`: its output, a server's address file, a container's log) uses the one loop
here for it.
"""

from __future__ import annotations

import asyncio
import enum
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from offload import _loop
from offload.errors import ConfigError, JobFailedError, OffloadError
from offload.jobfiles import RESERVED as RESERVED_FILES
from offload.jobfiles import JobPaths

MAX_LINE = 1 << 20  # bytes: a longer line (no newline yet) is handed on in pieces of this size
READ_CHUNK = 4 << 20  # bytes a log follower reads at once: memory stays bounded however far behind it starts

if TYPE_CHECKING:
    from offload.retry import RetryPolicy
    from offload.site import Site
    from offload.spec import JobSpec
    from offload.transports.base import Progress


class JobState(enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.TIMEOUT)


class EndCause(enum.Enum):
    """Why a job ended that its payload did not end itself, beyond what its :class:`JobState` says (a TIMEOUT
    or a CANCELLED is its state): set by the scheduler plugin from its own data, so what reads it (a pod's exit
    code, a retry policy) needs no scheduler's words."""

    OUT_OF_MEMORY = "OUT_OF_MEMORY"  # killed by the site's memory enforcement
    NODE_FAILURE = "NODE_FAILURE"  # its node was lost (or never booted)
    PREEMPTED = "PREEMPTED"  # made way for other work


@dataclass(frozen=True)
class JobStatus:
    """What the scheduler last said about a job. ``reason`` is the scheduler's own (e.g. ``Priority``), for
    people; ``cause`` and ``stuck`` are the same knowledge as data, for code."""

    state: JobState
    reason: str = ""
    exit_code: int | None = None
    node: str = ""
    signal: int | None = None
    cause: EndCause | None = None
    # A waiting job that will never start as it is, by the scheduler's own word (a per-job limit it exceeds, an
    # account or partition it may not use, an error state): waiting longer is pointless, another site may run it.
    stuck: bool = False

    def describe(self) -> str:
        """``PENDING (Resources)``, ``FAILED (NonZeroExitCode), exit code 3``, ``CANCELLED (signal 15)``."""
        details = [self.reason] if self.reason and self.reason not in ("None", "(null)") else []
        if self.signal:
            details.append(f"signal {self.signal}")
        text = self.state.value + (f" ({', '.join(details)})" if details else "")
        if self.state.is_terminal and self.exit_code is not None and not self.signal:
            text += f", exit code {self.exit_code}"
        return text


@dataclass(frozen=True)
class JobRef:
    """What the scheduler needs to find a job: its id and its directory on the site."""

    id: str
    jobdir: str
    index: int | None = None  # task index within an array

    @property
    def paths(self) -> JobPaths:
        """Where this job's (or array task's) files are on the site."""
        return JobPaths(self.jobdir, self.index)

    @property
    def output_path(self) -> str:
        return self.paths.output

    @property
    def exitcode_path(self) -> str:
        return self.paths.exit_code


class JobHost(Protocol):
    """All a :class:`Job` needs from the site it runs on: the poller's answers, cancel, and the job's files.
    Coroutines run on offload's private loop; a :class:`~offload.Site` hands one out as ``Site.job_host``."""

    interval: float  # how often a log follower looks for new output

    async def status(self, ref: JobRef, refresh: bool) -> JobStatus: ...

    async def wait(self, ref: JobRef, states: Collection[JobState],
                   on_change: Callable[[JobStatus], object] | None) -> JobStatus:  # fmt: skip
        """Return once the job is in one of ``states`` or has ended, riding the poller's rounds (no query of its
        own); ``on_change`` is told the first status seen and each that reads differently."""
        ...

    async def cancel(self, refs: list[JobRef]) -> None: ...

    async def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """The bytes of ``path`` from ``offset`` (negative: that many from the end), at most ``size`` of them;
        empty if it is missing."""
        ...

    async def write(self, path: str, data: bytes, mode: int) -> None: ...

    async def upload(self, local: str, path: str, progress: Progress | None) -> None:
        """Copy the local file ``local`` to ``path``, streamed (large files never sit in memory)."""
        ...

    async def download(self, path: str, local: str, progress: Progress | None) -> None: ...


_FINAL = tuple(state for state in JobState if state.is_terminal)
OnChange = Callable[[JobStatus], object]
Until = Callable[[], Awaitable[bool]]
RetryIf = Callable[[Exception], bool]
OnRetry = Callable[[Exception, float], object]


class Job:
    """A job on a site. Get one from :meth:`Site.submit` or :meth:`Site.job` (reattach by id)."""

    def __init__(self, site: Site, ref: JobRef, *, name: str | None = None, spec: JobSpec | None = None) -> None:
        self.site = site
        self.ref = ref
        self.name = name
        self.spec = spec
        self._host: JobHost = site.job_host

    @property
    def id(self) -> str:
        return self.ref.id

    def __repr__(self) -> str:
        return f"<Job {self.id} on {self.site.name}{f' {self.name!r}' if self.name else ''}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and (other.site.name, other.id) == (self.site.name, self.id)

    def __hash__(self) -> int:
        return hash((self.site.name, self.id))

    # -- status -----------------------------------------------------------------------------------------

    @_loop.on_loop
    async def astatus(self, refresh: bool = True) -> JobStatus:
        """The job's status; with ``refresh``, as of a scheduler query made now (shared with other callers)."""
        return await self._host.status(self.ref, refresh)

    status = _loop.blocking(astatus)

    @property
    def state(self) -> JobState:
        return self.status().state

    @property
    def exit_code(self) -> int | None:
        """The payload's exit code once the job ended (None before, or if the job never ran)."""
        return self.status().exit_code

    # -- waiting ----------------------------------------------------------------------------------------

    @_loop.on_loop
    async def finished(self, timeout: float | None = None, *, check: bool = False) -> JobStatus:
        """Wait for the job to end and return its final status. ``check=True`` raises :class:`JobFailedError`
        unless it COMPLETED."""
        status = await self._await_state(_FINAL, timeout, None, or_end=True)
        if check and status.state is not JobState.COMPLETED:
            raise await self._ended_error(status)
        return status

    wait = _loop.blocking(finished, name="wait")

    @_loop.on_loop
    async def await_state(self, *states: JobState, timeout: float | None = None, on_change: OnChange | None = None,
                          or_end: bool = False) -> JobStatus:  # fmt: skip
        """Wait until the job is in one of ``states`` (e.g. RUNNING) and return its status. Waiters ride the
        poller's rounds: any number of them cost no scheduler query of their own. ``on_change(status)`` is told
        the first status seen and then each that reads differently (``PENDING (Priority)``, ``PENDING
        (Resources)``, ``RUNNING`` on its node), for progress lines; it runs on offload's I/O thread: keep it short.

        A job that ends in another state first raises :class:`JobFailedError` saying the state and reason it
        ended in, with its log's last lines (``or_end=True``: its final status is returned instead); no such
        state within ``timeout`` seconds raises :class:`TimeoutError` naming the last state seen."""
        return await self._await_state(states, timeout, on_change, or_end)

    wait_for_state = _loop.blocking(await_state, name="wait_for_state")

    async def _await_state(self, states: Collection[JobState], timeout: float | None, on_change: OnChange | None,
                           or_end: bool) -> JobStatus:  # fmt: skip
        if not states:
            raise ConfigError("await_state needs the states to wait for, e.g. JobState.RUNNING")
        seen: list[JobStatus] = []

        def changed(status: JobStatus) -> None:
            seen[:] = [status]
            if on_change is not None:
                on_change(status)

        try:
            status = await asyncio.wait_for(self._host.wait(self.ref, states, changed), timeout)
        except TimeoutError:
            goal = "end" if set(states) <= set(_FINAL) else "become " + " or ".join(s.value for s in states)
            it_is = f"it is {seen[0].describe()}" if seen else "the site has not said its state yet"
            raise TimeoutError(f"job {self.id} on {self.site.name} did not {goal} within {timeout} s: {it_is}"
                               ) from None  # fmt: skip
        if status.state not in states and not or_end:
            raise await self._ended_error(status, " before it was " + " or ".join(s.value for s in states))
        return status

    async def _ended_error(self, status: JobStatus, before: str = "") -> JobFailedError:
        tail = await self._tail()
        return JobFailedError(
            f"job {self.id} on {self.site.name} ended {status.describe()}{before}. Last lines of its log:\n{tail}",
            job_id=self.id,
            state=status.state.value,
            exit_code=status.exit_code,
            log_tail=tail,
        )

    # -- logs -------------------------------------------------------------------------------------------

    async def _tail(self, lines: int = 20) -> str:
        """Read from the end only as much as the lines need (a log may be gigabytes)."""
        size = 64 * 1024
        while True:
            data = await self._host.read(self.ref.output_path, -size)
            if len(data) < size or data.count(b"\n") > lines or size >= 16 * 2**20:
                break
            size *= 4
        text = data.decode("utf-8", "replace").splitlines()
        if len(data) == size and len(text) > lines:
            text = text[1:]  # the first line read may be cut
        return "\n".join(text[-lines:])

    @_loop.on_loop
    async def atail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the job's output (stdout and stderr together)."""
        return await self._tail(lines)

    tail = _loop.blocking(atail)

    @_loop.on_loop
    async def aoutput(self, offset: int = 0) -> bytes:
        """The job's output (stdout and stderr) from byte ``offset`` on, as far as it is written now: for
        followers that keep their own place, e.g. an Airflow trigger that resumes where the last one stopped."""
        return await self._host.read(self.ref.output_path, offset)

    output = _loop.blocking(aoutput)

    @_loop.on_loop_iter
    def alogs(self, follow: bool = False, interval: float | None = None) -> AsyncIterator[str]:
        """The job's output line by line; with ``follow``, streams until the job ends (like ``tail -f``).

        A follower reads new output every ``interval`` seconds (default: the site's poll interval)."""
        return self._read_lines(follow, interval)

    logs = _loop.blocking_iter(alogs)

    async def _read_lines(self, follow: bool, interval: float | None = None) -> AsyncIterator[str]:
        pending = b""
        async for chunk in self._follow(self.ref.output_path, follow=follow, interval=interval):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            for raw in complete:
                for start in range(0, max(len(raw), 1), MAX_LINE):
                    yield raw[start : start + MAX_LINE].decode("utf-8", "replace")
            while len(pending) > MAX_LINE:  # a progress bar redrawn with \r for hours: bounded memory
                yield pending[:MAX_LINE].decode("utf-8", "replace")
                pending = pending[MAX_LINE:]
        if pending:
            yield pending.decode("utf-8", "replace")

    @_loop.on_loop_iter
    def afollow(self, name: str | None = None, offset: int = 0, *, until: Until | None = None,
                interval: float | None = None, retry: RetryPolicy | None = None,
                retry_if: RetryIf | None = None,
                on_retry: OnRetry | None = None) -> AsyncIterator[bytes]:  # fmt: skip
        """What is written to the file ``name`` of the job's directory (default: the job's output, stdout and
        stderr together) from byte ``offset`` on, as it comes (``tail -c +N -f``), in pieces of at most
        ``READ_CHUNK`` bytes however far behind it starts. It ends when the job ends, or when ``await until()``
        says the file is done (asked while it is quiet: a container's exit, a deadline), after one more read,
        so nothing written last is lost. A caller keeps its place by counting what it got.

        New bytes are looked for every ``interval`` seconds (default: the site's poll interval; no faster than
        that while the job queues). A read that fails raises, unless ``retry`` (a :class:`RetryPolicy`) reads
        again: errors ``retry_if`` accepts (default: all), after ``on_retry(exc, pause)``; every read that works
        starts the policy afresh. ``until`` and ``on_retry`` run on offload's I/O loop (``until`` is a coroutine
        function in the sync form :meth:`follow` too)."""
        path = self._file(name)  # a name that is no plain file of the job's directory raises here, at the call
        return self._follow(path, offset, until=until, interval=interval, retry=retry, retry_if=retry_if,
                            on_retry=on_retry)  # fmt: skip

    follow = _loop.blocking_iter(afollow)

    async def _follow(self, path: str, offset: int = 0, *, follow: bool = True, until: Until | None = None,
                      interval: float | None = None, retry: RetryPolicy | None = None,
                      retry_if: RetryIf | None = None,
                      on_retry: OnRetry | None = None) -> AsyncIterator[bytes]:  # fmt: skip
        """The one loop that follows a file of a job (see :meth:`afollow`); without ``follow``, what is there."""
        host = self._host
        watcher = asyncio.ensure_future(host.wait(self.ref, _FINAL, None)) if follow else None
        tries = retry.start() if retry is not None else None
        done = False  # until() said so: one more read, then the end
        try:
            while True:
                ended = done or watcher is None or watcher.done()
                try:
                    chunk = await host.read(path, offset, READ_CHUNK)  # a 300 MiB log: in pieces
                    done = done or (not chunk and not ended and until is not None and await until())
                except OffloadError as exc:
                    if tries is None or (retry_if is not None and not retry_if(exc)) or tries.failed() is None:
                        raise
                    if on_retry is not None:
                        on_retry(exc, tries.next_pause)
                    await tries.wait()
                    continue
                if tries is not None:
                    tries.reset()
                if chunk:
                    offset += len(chunk)
                    yield chunk
                elif ended:
                    return
                elif not done:
                    assert watcher is not None
                    await asyncio.wait({watcher}, timeout=await self._pause(interval))
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _pause(self, interval: float | None) -> float:
        """How long a follower waits before it reads again: ``interval`` while the job runs, but no faster than
        the site's poll interval while it has not started (a queued job writes nothing; a Dask cluster whose
        scheduler job queues for an hour would otherwise read its log ten times a second)."""
        slow = self._host.interval
        if interval is None or interval >= slow:
            return interval or slow
        try:
            seen = await self._host.status(self.ref, refresh=False)
        except OffloadError:
            return slow
        return slow if seen.state in (JobState.PENDING, JobState.UNKNOWN) else interval

    # -- files in the job's directory -------------------------------------------------------------------

    def _file(self, name: str | None) -> str:
        return self.ref.output_path if name is None else self._path(name)

    def _path(self, name: str) -> str:
        if not name or "/" in name or name in (".", "..") or name in RESERVED_FILES:
            raise ConfigError(f"{name!r} is not a plain file name of the job's directory (or is offload's own)")
        return f"{self.ref.jobdir}/{name}"

    @_loop.on_loop
    async def aput(self, name: str, data: bytes, mode: int = 0o600) -> None:
        """Write ``data`` to the file ``name`` in the job's directory (``$OFFLOAD_JOB_DIR/name`` inside)."""
        await self._host.write(self._path(name), data, mode)

    put = _loop.blocking(aput)

    @_loop.on_loop
    async def aget(self, name: str, offset: int = 0, size: int | None = None) -> bytes:
        """The bytes of the file ``name`` in the job's directory from byte ``offset`` on (negative: that many
        from its end), at most ``size`` of them (empty if it does not exist): a follower of a file the job writes
        keeps its own place, as with :meth:`aoutput`, and a reader of a big log's end reads only that."""
        return await self._host.read(self._path(name), offset, size)

    get = _loop.blocking(aget)

    @_loop.on_loop
    async def aupload(self, local: str | os.PathLike[str], name: str | None = None,
                      progress: Progress | None = None) -> None:  # fmt: skip
        """Copy a local file (of any size: streamed, in parallel blocks) to ``name`` in the job's directory
        (default: its own name). ``progress(done, total)`` is called as bytes go."""
        path = self._path(name or os.path.basename(local))
        await self._host.upload(os.fspath(local), path, progress)

    upload = _loop.blocking(aupload)

    @_loop.on_loop
    async def adownload(self, name: str, local: str | os.PathLike[str], progress: Progress | None = None) -> None:
        """Copy the file ``name`` of the job's directory to the local file ``local`` (streamed, any size)."""
        await self._host.download(self._path(name), os.fspath(local), progress)

    download = _loop.blocking(adownload)

    # -- cancel -----------------------------------------------------------------------------------------

    @_loop.on_loop
    async def acancel(self) -> None:
        """Cancel the job (a no-op for a job that already ended)."""
        await self._host.cancel([self.ref])

    cancel = _loop.blocking(acancel)
