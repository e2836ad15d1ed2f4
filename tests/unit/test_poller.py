"""The poller alone, with the scheduler query stubbed at its seam: one query per round for everything due,
backoff for jobs that wait long, a hung query answered within one timeout, ended jobs dropped."""

from __future__ import annotations

import asyncio

import pytest

from offload import OffloadError
from offload import poller as poller_mod
from offload.jobs import JobRef, JobState, JobStatus
from offload.poller import Poller


class Scheduler:
    def __init__(self) -> None:
        self.states: dict[str, JobState] = {}
        self.calls: list[list[str]] = []
        self.hang: asyncio.Event | None = None

    async def poll(self, refs):
        self.calls.append([r.id for r in refs])
        if self.hang is not None:
            await self.hang.wait()
            raise OffloadError("the site is not answering")
        return {r.id: JobStatus(self.states.get(r.id, JobState.PENDING)) for r in refs}


async def test_long_pending_jobs_are_asked_about_less_often(monkeypatch):
    monkeypatch.setattr(poller_mod, "BACKOFF_AFTER", 0.2)
    monkeypatch.setattr(poller_mod, "BACKOFF_SLOPE", 1.0)
    monkeypatch.setattr(poller_mod, "MAX_PENDING_INTERVAL", 0.4)
    scheduler = Scheduler()
    poller = Poller(scheduler.poll, 0.02, lambda ref, status: None)
    refs = [JobRef(str(i), "/d") for i in range(50)]
    waiters = [asyncio.ensure_future(poller.wait(ref)) for ref in refs]
    await asyncio.sleep(2.0)
    assert all(len(call) == 50 for call in scheduler.calls)  # one query asks about every job that is due
    without_backoff = 2.0 / 0.02
    assert len(scheduler.calls) < without_backoff / 3
    for ref in refs:
        scheduler.states[ref.id] = JobState.COMPLETED
    statuses = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert {s.state for s in statuses} == {JobState.COMPLETED}
    assert poller._refs == {}  # ended and unwatched: off the watch list


async def test_a_refresh_during_a_hung_query_gets_its_error():
    scheduler = Scheduler()
    poller = Poller(scheduler.poll, 0.05, lambda ref, status: None)
    ref = JobRef("1", "/d")
    assert (await poller.status(ref)).state is JobState.PENDING
    scheduler.hang = asyncio.Event()
    waiter = asyncio.ensure_future(poller.wait(ref))
    await asyncio.sleep(0.2)  # a round is now stuck in the hung query
    asking = asyncio.ensure_future(poller.status(ref, refresh=True))
    await asyncio.sleep(0.1)
    scheduler.hang.set()  # the query times out...
    with pytest.raises(OffloadError, match="not answering"):
        await asyncio.wait_for(asking, 2)  # ...and the caller hears it after that one query, not a second one
    scheduler.hang = None
    scheduler.states["1"] = JobState.FAILED
    assert (await asyncio.wait_for(waiter, 5)).state is JobState.FAILED  # the waiter rode it out


async def test_a_failed_query_about_other_jobs_does_not_fail_a_refresh():
    """A round stuck on a fault that has cleared since (other jobs of a long-lived site, asked about while squeue
    hung) goes first, but its error is not the answer about a job it did not ask about: that job is asked about
    in the next round (CI run of stop 32 failed a fresh job's first status on an old round's timeout)."""
    scheduler = Scheduler()
    poller = Poller(scheduler.poll, 0.05, lambda ref, status: None)
    old = JobRef("old", "/d")
    assert (await poller.status(old)).state is JobState.PENDING
    scheduler.hang = asyncio.Event()
    waiter = asyncio.ensure_future(poller.wait(old))
    await asyncio.sleep(0.2)  # a round about "old" is stuck
    asking = asyncio.ensure_future(poller.status(JobRef("new", "/d"), refresh=True))
    await asyncio.sleep(0.1)
    hung, scheduler.hang = scheduler.hang, None  # the fault clears...
    hung.set()  # ...and the stuck round fails
    assert (await asyncio.wait_for(asking, 2)).state is JobState.PENDING
    assert scheduler.calls[-1] == ["new"] or "new" in scheduler.calls[-1]
    scheduler.states["old"] = JobState.COMPLETED
    await asyncio.wait_for(waiter, 5)


async def test_jobs_watched_from_different_moments_share_the_rounds():
    """Two hub users' sessions (or jobs submitted a moment apart) fall into step: one query for both."""
    scheduler = Scheduler()
    poller = Poller(scheduler.poll, 0.2, lambda ref, status: None)
    first = asyncio.ensure_future(poller.wait(JobRef("a", "/d")))
    await asyncio.sleep(0.07)
    second = asyncio.ensure_future(poller.wait(JobRef("b", "/d")))
    await asyncio.sleep(1.0)
    later = scheduler.calls[2:]
    assert later and all(sorted(call) == ["a", "b"] for call in later), scheduler.calls
    assert len(scheduler.calls) <= 1.0 / 0.2 + 2
    for ref_id in ("a", "b"):
        scheduler.states[ref_id] = JobState.COMPLETED
    await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_cached_answers_keep_the_rounds_going_for_their_job():
    """A caller that only reads the cache (the hub's poll(), interLink's /status) still sees the job end."""
    scheduler = Scheduler()
    poller = Poller(scheduler.poll, 0.02, lambda ref, status: None)
    ref = JobRef("7", "/d")
    poller.known(ref, JobStatus(JobState.PENDING))  # as after a submission: nobody waits on it
    assert (await poller.status(ref, refresh=False)).state is JobState.PENDING
    scheduler.states["7"] = JobState.COMPLETED
    for _ in range(100):
        if (await poller.status(ref, refresh=False)).state is JobState.COMPLETED:
            break
        await asyncio.sleep(0.02)
    assert (await poller.status(ref, refresh=False)).state is JobState.COMPLETED
    assert len(scheduler.calls) < 20


async def test_a_job_accounting_calls_running_ends_when_its_exit_code_file_says_so():
    """squeue forgot the job, sacct still says RUNNING (slurmdbd backlogged): the exit code file ends the wait."""
    from offload.schedulers.slurm import SlurmScheduler

    from .test_slurm import SITE, Replies

    site = Replies(squeue=(0, "", ""), sacct=(0, "5|RUNNING|0:0|n1\n", ""), sh=(0, "/d/exitcode|0\nnow|100\n", ""))
    scheduler = SlurmScheduler(SITE)
    poller = Poller(lambda refs: scheduler.poll(site, refs), 0.02, lambda ref, status: None)
    status = await asyncio.wait_for(poller.wait(JobRef("5", "/d")), 5)
    assert (status.state, status.exit_code) == (JobState.COMPLETED, 0)


async def test_a_job_the_site_never_knew_is_forgotten_once_nobody_asks(monkeypatch):
    """A hub or plugin lives for months: a job that stays UNKNOWN (purged from accounting) and that nobody waits
    for or asks about is no longer asked about every round; asked again, it is watched again."""
    monkeypatch.setattr(poller_mod, "FORGET_UNKNOWN_AFTER", 0.3)
    scheduler = Scheduler()
    scheduler.states = {"lost": JobState.UNKNOWN, "queued": JobState.PENDING}
    poller = Poller(scheduler.poll, 0.02, lambda ref, status: None)
    lost, queued = JobRef("lost", "/d"), JobRef("queued", "/d")
    assert (await poller.status(lost)).state is JobState.UNKNOWN
    waiter = asyncio.ensure_future(poller.wait(queued))
    await asyncio.sleep(0.8)
    recent = scheduler.calls[-5:]
    assert all(call == ["queued"] for call in recent)  # the lost one left the rounds, the waited one did not
    assert (await poller.status(lost)).state is JobState.UNKNOWN
    assert "lost" in scheduler.calls[-1]
    waiter.cancel()
