"""One status poller per site: one scheduler query per round for every job being watched.

dask-jobqueue never asks SLURM about its jobs; per-task Airflow operators ask once per job per interval.
Here every waiter, log follower and ``status()`` call of a site shares one query: waiters ride the periodic
rounds, and ``refresh`` requests made while a round is in flight join it (or the next one) instead of adding
calls. Like submitit's watcher:

* a job that has waited long in the queue is asked about less often (from the interval up to a minute), while a
  round still asks about every job that is due in one call;
* UNKNOWN is not finished: only a terminal state the scheduler (or the job's exit code file) reported is final,
  and only that is cached for good;
* a failed query is logged and retried; a waiter keeps waiting through it, while ``status(refresh=True)``
  raises it, so a hung site gives a clear error within one command timeout;
* finished jobs nobody waits for leave the watch list (their last status is remembered, within limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from offload.errors import OffloadError
from offload.jobs import JobRef, JobState, JobStatus

log = logging.getLogger("offload.poller")

PollFn = Callable[[list[JobRef]], Coroutine[Any, Any, dict[str, JobStatus]]]
MAX_PENDING_INTERVAL = 60.0  # seconds between questions about a job long pending
MAX_RUNNING_INTERVAL = 5.0  # ... and about one long running (its end is seen at most this late)
BACKOFF_AFTER = 30.0  # seconds without a change before the interval grows...
BACKOFF_SLOPE = 0.1  # ... to this share of the quiet time (10 min quiet: asked once a minute)
FORGET_UNKNOWN_AFTER = 3600.0  # seconds a job nobody asks about stays watched while the site knows nothing of it
REMEMBERED = 10_000  # final statuses kept for jobs nobody watches any more


class _Round:
    """One scheduler query: which jobs it asks about, and how it went."""

    def __init__(self) -> None:
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.ids: set[str] = set()
        self.error: OffloadError | None = None


class Poller:
    def __init__(self, poll: PollFn, interval: float, on_terminal: Callable[[JobRef, JobStatus], Any],
                 on_start: Callable[[JobRef], Any] | None = None) -> None:  # fmt: skip
        self._poll = poll
        self.interval = interval
        self._on_terminal = on_terminal
        self._on_start = on_start  # told when a job is first seen RUNNING
        self._refs: dict[str, JobRef] = {}  # jobs not known to have ended
        self._status: OrderedDict[str, JobStatus] = OrderedDict()
        self._changed: dict[str, float] = {}
        self._due: dict[str, float] = {}
        self._watchers: Counter[str] = Counter()
        self._asked: dict[str, float] = {}  # when a caller last asked about a job
        self._forced: set[str] = set()
        self._current: _Round | None = None
        self._upcoming: _Round | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.polls = 0
        self._failing = False

    # -- what callers use ---------------------------------------------------------------------------

    def known(self, ref: JobRef, status: JobStatus) -> None:
        """Record a status learnt elsewhere (e.g. PENDING right after submission); the job is watched."""
        if ref.id not in self._status:
            self._status[ref.id] = status
        if not status.state.is_terminal:
            self._track(ref)

    def cached(self, job_id: str) -> JobStatus | None:
        return self._status.get(job_id)

    async def status(self, ref: JobRef, refresh: bool = True) -> JobStatus:
        """The job's status; with ``refresh``, from a query made now (raises if the site does not answer)."""
        current = self._status.get(ref.id)
        if current is not None and current.state.is_terminal:
            return current
        self._asked[ref.id] = time.monotonic()
        self._track(ref)
        if current is not None and not refresh:  # the last round's answer; the rounds go on for it
            self._ensure_running()
            return current
        self._ensure_running()
        flight = self._current
        if flight is not None and not flight.done.done():
            # A query about this job is on its way (perhaps hung): its outcome, so a hung site costs one timeout.
            # A query that does not ask about it only goes first: its failure says nothing of this job (it may
            # have hung on a fault that has cleared since), so this job is asked about in the next round.
            await asyncio.shield(flight.done)
            if ref.id in flight.ids:
                if flight.error is not None:
                    raise flight.error
                return self._status.get(ref.id, _unseen())
        self._forced.add(ref.id)
        assert self._upcoming is not None and self._wake is not None
        upcoming = self._upcoming
        self._wake.set()
        await asyncio.shield(upcoming.done)
        if upcoming.error is not None:
            raise upcoming.error
        return self._status.get(ref.id, _unseen())

    async def wait(self, ref: JobRef, states: Collection[JobState] = (),
                   on_change: Callable[[JobStatus], Any] | None = None) -> JobStatus:  # fmt: skip
        """Return once the job is in one of ``states`` or in a terminal state (through any number of failed
        queries), riding the rounds: however many wait, a round's one query answers them all. ``on_change`` is
        told the first status seen and then each that reads differently (state, reason, node)."""
        self._watchers[ref.id] += 1
        told: tuple[str, str] | None = None
        try:
            while True:
                current = self._status.get(ref.id)
                if current is not None:
                    if on_change is not None and (current.describe(), current.node) != told:
                        told = (current.describe(), current.node)
                        on_change(current)
                    if current.state in states or current.state.is_terminal:
                        return current
                self._track(ref)
                await self.next_poll(ref)
        finally:
            self._watchers[ref.id] -= 1
            if not self._watchers[ref.id]:
                del self._watchers[ref.id]

    async def next_poll(self, ref: JobRef) -> None:
        """Wait for the next round (which asks about ``ref`` once it is due)."""
        self._track(ref)
        self._ensure_running()
        assert self._upcoming is not None
        await asyncio.shield(self._upcoming.done)

    # -- the loop -----------------------------------------------------------------------------------

    def _track(self, ref: JobRef) -> None:
        if ref.id in self._refs:
            return
        status = self._status.get(ref.id)
        if status is not None and status.state.is_terminal:
            return
        now = time.monotonic()
        self._refs[ref.id] = ref
        self._changed.setdefault(ref.id, now)
        self._due.setdefault(ref.id, now)

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._upcoming = _Round()
            self._task = loop.create_task(self._run())

    def _interval(self, job_id: str, now: float) -> float:
        """Ask about a job that has not changed for a while less often (one query still serves all)."""
        quiet = now - self._changed.get(job_id, now)
        if quiet < BACKOFF_AFTER:
            return self.interval
        status = self._status.get(job_id)
        cap = MAX_RUNNING_INTERVAL if status is not None and status.state is JobState.RUNNING else MAX_PENDING_INTERVAL
        return max(self.interval, min(cap, quiet * BACKOFF_SLOPE))

    async def _run(self) -> None:
        assert self._wake is not None
        idle_rounds = 0
        while True:
            now = time.monotonic()
            next_due = min((self._due.get(i, now) for i in self._refs), default=now + self.interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, min(next_due - now, self.interval)))
            self._wake.clear()
            now = time.monotonic()
            # Jobs due within half an interval ride this round too: watchers that started at different moments
            # (two hub users, a cluster's jobs submitted a second apart) fall into step instead of each costing
            # a query per interval.
            slack = self.interval / 2
            due = {i for i in self._refs if self._due.get(i, now) <= now + slack} | (self._forced & set(self._refs))
            self._forced.clear()
            assert self._upcoming is not None
            round_, self._upcoming = self._upcoming, _Round()
            self._current = round_
            round_.ids = due
            if due:
                idle_rounds = 0
                await self._poll_once(round_, [self._refs[i] for i in due])
            elif not self._refs:
                idle_rounds += 1
            self._current = None
            if not round_.done.done():
                round_.done.set_result(None)
            if not self._refs and idle_rounds > 2 and not self._watchers:
                # Nothing to watch: stop, and let the next caller start a fresh loop.
                if not self._upcoming.done.done():
                    self._upcoming.done.set_result(None)
                self._task = None
                return

    async def _poll_once(self, round_: _Round, refs: list[JobRef]) -> None:
        self.polls += 1
        try:
            statuses = await self._poll(refs)
        except OffloadError as exc:
            # The site is unreachable or slow for now; jobs keep running there. Waiters retry next round.
            round_.error = exc
            if not self._failing:
                log.warning("could not get job states from the site (will retry): %s", exc)
            self._failing = True
            self._reschedule(refs, retry=True)
            return
        except Exception as exc:
            log.exception("polling job states failed")
            round_.error = OffloadError(f"polling failed: {exc!r}")
            self._reschedule(refs, retry=True)
            return
        if self._failing:
            log.warning("the site answers again")
            self._failing = False
        now = time.monotonic()
        for ref in refs:
            status = statuses.get(ref.id)
            if status is None:
                continue
            previous = self._status.get(ref.id)
            self._status[ref.id] = status
            self._status.move_to_end(ref.id)
            if previous is None or previous.state is not status.state:
                self._changed[ref.id] = now
                if status.state is JobState.RUNNING and self._on_start is not None:
                    try:
                        self._on_start(ref)
                    except Exception:  # a record-keeping failure must not stop polling
                        log.exception("recording the start of job %s failed", ref.id)
            if status.state.is_terminal:
                self._drop(ref.id)
                if previous is None or not previous.state.is_terminal:
                    try:
                        self._on_terminal(ref, status)
                    except Exception:  # a record-keeping failure must not stop polling
                        log.exception("recording the end of job %s failed", ref.id)
        self._reschedule([ref for ref in refs if ref.id in self._refs])
        for ref in refs:  # a long-lived process must not ask for ever about jobs the site never knew
            status = self._status.get(ref.id)
            unknown_since = (
                self._changed.get(ref.id, now) if status is None or status.state is JobState.UNKNOWN else now
            )
            if (ref.id in self._refs and not self._watchers[ref.id] and now - unknown_since > FORGET_UNKNOWN_AFTER
                    and now - self._asked.get(ref.id, 0.0) > FORGET_UNKNOWN_AFTER):  # fmt: skip
                self._drop(ref.id)  # asked again later, it is watched again
        while len(self._status) > REMEMBERED + len(self._refs):
            oldest = next(iter(self._status))
            if oldest in self._refs:
                self._status.move_to_end(oldest)
                continue
            del self._status[oldest]

    def _reschedule(self, refs: list[JobRef], retry: bool = False) -> None:
        now = time.monotonic()
        for ref in refs:
            if ref.id in self._refs:
                self._due[ref.id] = now + (self.interval if retry else self._interval(ref.id, now))

    def _drop(self, job_id: str) -> None:
        """An ended job leaves the watch list; its final status stays remembered."""
        self._refs.pop(job_id, None)
        self._due.pop(job_id, None)
        self._changed.pop(job_id, None)
        self._asked.pop(job_id, None)


def _unseen() -> JobStatus:
    return JobStatus(JobState.UNKNOWN, "not seen by the scheduler")
