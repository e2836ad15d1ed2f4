"""One status poller per site: one scheduler query per interval for every job being watched.

dask-jobqueue never asks SLURM about its jobs; per-task Airflow operators ask once per job per interval.
Here every waiter, log follower and ``status()`` call of a site shares one query: waiters ride the periodic
poll, and ``refresh`` requests made while a query is in flight join the next one instead of adding calls.
Terminal states are cached and never asked for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from offload.errors import OffloadError, TransportError
from offload.jobs import JobRef, JobState, JobStatus

log = logging.getLogger("offload.poller")

PollFn = Callable[[list[JobRef]], Coroutine[Any, Any, dict[str, JobStatus]]]


class Poller:
    def __init__(self, poll: PollFn, interval: float, on_terminal: Callable[[JobRef, JobStatus], Any]) -> None:
        self._poll = poll
        self.interval = interval
        self._on_terminal = on_terminal
        self._refs: dict[str, JobRef] = {}
        self._status: dict[str, JobStatus] = {}
        self._watchers: dict[str, int] = {}
        self._next: asyncio.Future[None] | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self._last_error: OffloadError | None = None

    def known(self, ref: JobRef, status: JobStatus) -> None:
        """Record a status learnt elsewhere (e.g. PENDING right after submission)."""
        self._refs.setdefault(ref.id, ref)
        self._status.setdefault(ref.id, status)

    async def status(self, ref: JobRef, refresh: bool = True) -> JobStatus:
        current = self._status.get(ref.id)
        if current is not None and (current.state.is_terminal or not refresh):
            return current
        await self.next_poll(ref, wake=True)
        return self._status.get(ref.id, JobStatus(JobState.UNKNOWN, "not seen by the scheduler"))

    async def wait(self, ref: JobRef) -> JobStatus:
        """Return once the job is in a terminal state."""
        self._watchers[ref.id] = self._watchers.get(ref.id, 0) + 1
        try:
            while True:
                current = self._status.get(ref.id)
                if current is not None and current.state.is_terminal:
                    return current
                await self.next_poll(ref)
        finally:
            self._watchers[ref.id] -= 1
            if not self._watchers[ref.id]:
                del self._watchers[ref.id]

    async def next_poll(self, ref: JobRef, *, wake: bool = False) -> None:
        """Wait for the next poll that includes ``ref`` (``wake``: start it now rather than at the interval)."""
        self._refs.setdefault(ref.id, ref)
        self._ensure_running()
        assert self._next is not None and self._wake is not None
        upcoming = self._next
        if wake:
            self._wake.set()
        await asyncio.shield(upcoming)
        if self._last_error is not None and ref.id not in self._status:
            raise self._last_error

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._next = loop.create_future()
            self._task = loop.create_task(self._run())

    def _pending(self) -> list[JobRef]:
        return [ref for job_id, ref in self._refs.items() if not self._is_terminal(job_id)]

    def _is_terminal(self, job_id: str) -> bool:
        status = self._status.get(job_id)
        return status is not None and status.state.is_terminal

    async def _run(self) -> None:
        assert self._wake is not None
        idle_rounds = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            done, self._next = self._next, asyncio.get_running_loop().create_future()
            refs = self._pending()
            if refs:
                idle_rounds = 0
                await self._poll_once(refs)
            else:
                idle_rounds += 1
            assert done is not None
            if not done.done():
                done.set_result(None)
            if not refs and idle_rounds > 2 and not self._watchers:
                # Nothing to watch: stop, and let the next caller start a fresh loop.
                if not self._next.done():
                    self._next.set_result(None)
                self._task = None
                return

    async def _poll_once(self, refs: list[JobRef]) -> None:
        self.polls += 1
        try:
            statuses = await self._poll(refs)
            self._last_error = None
        except TransportError as exc:
            # The site is unreachable for now; jobs keep running there. Waiters retry on the next round.
            log.warning("could not poll job states: %s", exc)
            self._last_error = exc
            return
        except Exception as exc:
            log.exception("polling job states failed")
            self._last_error = exc if isinstance(exc, OffloadError) else OffloadError(f"polling failed: {exc!r}")
            return
        for ref in refs:
            status = statuses.get(ref.id)
            if status is None:
                continue
            previous = self._status.get(ref.id)
            self._status[ref.id] = status
            if status.state.is_terminal and (previous is None or not previous.state.is_terminal):
                try:
                    self._on_terminal(ref, status)
                except Exception:  # a record-keeping failure must not stop polling
                    log.exception("recording the end of job %s failed", ref.id)
