"""A log follower (Job.alogs(follow=True)) against a stand-in JobHost (the seam a Site hands a Job)."""

from __future__ import annotations

from types import SimpleNamespace

from offload.jobs import MAX_LINE, Job, JobRef, JobState, JobStatus


class Host:
    """Serves ``output`` once, then nothing; the job is in ``state`` and ends when ``ended`` is set."""

    interval = 5.0

    def __init__(self, output: bytes, state: JobState) -> None:
        self.output, self.state, self.reads = output, state, 0

    async def status(self, ref, refresh):
        return JobStatus(self.state)

    async def wait(self, ref, states, on_change):
        return JobStatus(JobState.COMPLETED)

    async def read(self, path, offset=0, size=None):
        self.reads += 1
        return self.output[offset:] if size is None else self.output[offset : offset + size]


def job(host: Host) -> Job:
    return Job(SimpleNamespace(job_host=host, name="fake"), JobRef("1", "/jobs/1"))


async def test_a_follower_reads_no_faster_than_the_poll_interval_while_the_job_queues():
    queued, running = job(Host(b"", JobState.PENDING)), job(Host(b"", JobState.RUNNING))
    assert await queued._pause(0.1) == Host.interval  # a queued job writes nothing: no 10 reads a second
    assert await running._pause(0.1) == 0.1
    assert await running._pause(None) == Host.interval


async def test_a_line_without_end_is_handed_on_in_bounded_pieces():
    """A progress bar redrawn with \\r never ends its line: the follower's buffer stays bounded."""
    bar = b"\r 42%" * (3 * MAX_LINE // 5 + 1)
    pieces = [line async for line in job(Host(bar + b"\ndone\n", JobState.RUNNING))._read_lines(follow=True)]
    assert all(len(p) <= MAX_LINE for p in pieces)
    assert "".join(pieces[:-1]).encode() == bar and pieces[-1] == "done"


async def test_a_wait_that_times_out_says_the_state_it_saw():
    class Queued(Host):
        async def wait(self, ref, states, on_change):
            import asyncio

            on_change(await self.status(ref, False))
            await asyncio.sleep(3600)

        async def status(self, ref, refresh):
            return JobStatus(JobState.PENDING, reason="Resources")

    import pytest

    with pytest.raises(TimeoutError, match=r"did not end within 0.1 s: it is PENDING \(Resources\)"):
        await job(Queued(b"", JobState.PENDING)).finished(0.1)


async def test_a_follower_far_behind_reads_in_bounded_pieces():
    """A restarted follower of a long log (an Airflow triggerer, kubectl logs) never asks for all of it at once."""
    from offload.jobs import READ_CHUNK

    sizes = []

    class Recording(Host):
        async def read(self, path, offset=0, size=None):
            sizes.append(size)
            return await super().read(path, offset, size)

    log = b"x" * 100 + b"\n"
    lines = [
        line async for line in job(Recording(log * (3 * READ_CHUNK // len(log)), JobState.RUNNING))._read_lines(True)
    ]
    assert len(lines) == 3 * READ_CHUNK // len(log)
    assert sizes and all(size == READ_CHUNK for size in sizes)


# -- Job.afollow: the one follower of a file the job writes ----------------------------------------------------


async def test_a_follower_reads_once_more_after_the_end_so_the_last_words_arrive():
    import asyncio

    class Ending(Host):
        async def wait(self, ref, states, on_change):
            await asyncio.sleep(0.3)
            self.output += b"last words\n"  # written as the job ends: the follower has seen the file quiet
            return JobStatus(JobState.COMPLETED)

    host = Ending(b"first\n", JobState.RUNNING)
    got = [chunk async for chunk in job(host).afollow(interval=0.02)]
    assert b"".join(got) == b"first\nlast words\n"
    assert host.reads > 3  # it did wait for the end, reading a quiet file at its pace


def test_a_follower_from_an_offset_reads_in_bounded_pieces():
    from offload.jobs import READ_CHUNK

    sizes = []

    class Recording(Host):
        async def read(self, path, offset=0, size=None):
            sizes.append(size)
            return await super().read(path, offset, size)

    output = bytes(range(256)) * (2 * READ_CHUNK // 256 + 7)
    got = list(job(Recording(output, JobState.COMPLETED)).follow(offset=1000))  # the sync form
    assert b"".join(got) == output[1000:]
    assert all(len(chunk) <= READ_CHUNK for chunk in got) and set(sizes) == {READ_CHUNK}


async def test_a_callers_predicate_ends_a_follower_of_a_job_that_goes_on():
    """interLink's /getLogs follows one container of a pod's job: the container's exit ends it, not the job's."""
    import asyncio

    class Forever(Host):
        async def wait(self, ref, states, on_change):
            await asyncio.sleep(3600)

    host = Forever(b"one\n", JobState.RUNNING)
    asked = []

    async def container_ended() -> bool:
        asked.append(True)
        if len(asked) < 3:
            return False
        host.output += b"two\n"  # its last line lands as its exit is recorded
        return True

    follower = job(host).afollow("c.log", until=container_ended, interval=0.02)
    got = await asyncio.wait_for(_collect(follower), 5)
    assert got == b"one\ntwo\n" and len(asked) == 3


async def _collect(chunks) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def test_a_follower_reads_again_after_failures_its_retry_policy_allows():
    import pytest

    from offload import RetryPolicy, SiteNotAnswering

    class Flaky(Host):
        def __init__(self) -> None:
            super().__init__(b"out\n", JobState.COMPLETED)
            self.failures = 2

        async def read(self, path, offset=0, size=None):
            if self.failures:
                self.failures -= 1
                raise SiteNotAnswering("cat did not answer within 45 s")
            return await super().read(path, offset, size)

    told = []
    policy = RetryPolicy(first=0.01, cap=0.01, attempts=3)
    got = [c async for c in job(Flaky()).afollow(retry=policy, on_retry=lambda exc, pause: told.append(str(exc)))]
    assert got == [b"out\n"] and told == ["cat did not answer within 45 s"] * 2
    spent = RetryPolicy(first=0.01, cap=0.01, attempts=2)
    for options in ({}, {"retry": policy, "retry_if": lambda exc: False}, {"retry": spent}):
        with pytest.raises(SiteNotAnswering):  # no policy, an error it does not take, or its tries spent
            [c async for c in job(Flaky()).afollow(**options)]


def test_a_follower_follows_only_plain_files_of_the_jobs_directory():
    import pytest

    from offload import ConfigError

    for name in ("../x", "exitcode", ""):
        with pytest.raises(ConfigError):
            job(Host(b"", JobState.RUNNING)).follow(name)


# -- Job.await_state: the one wait for a state, on the poller's rounds -----------------------------------------


class Polled(Host):
    """A real poller over a scheduler that answers ``answers`` one a round (the last one again and again)."""

    interval = 0.01

    def __init__(self, output: bytes, *answers: JobStatus) -> None:
        from offload.poller import Poller

        super().__init__(output, JobState.UNKNOWN)
        self.answers, self.polls = list(answers), 0
        self.poller = Poller(self.poll, self.interval, lambda ref, status: None)

    async def poll(self, refs):
        self.polls += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return {ref.id: answer for ref in refs}

    async def status(self, ref, refresh):
        return await self.poller.status(ref, refresh)

    async def wait(self, ref, states, on_change):
        return await self.poller.wait(ref, states, on_change)


PRIORITY, RESOURCES = JobStatus(JobState.PENDING, "Priority"), JobStatus(JobState.PENDING, "Resources")


async def test_await_state_tells_each_change_once_and_costs_no_query_of_its_own():
    import asyncio

    running = JobStatus(JobState.RUNNING, node="n1")
    host = Polled(b"", PRIORITY, PRIORITY, RESOURCES, RESOURCES, running)
    told: list[list[str]] = [[], [], []]
    waiters = [job(host)._await_state((JobState.RUNNING,), None, seen.append, False) for seen in told]
    statuses = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert all(status == running for status in statuses)
    assert [[s.describe() for s in seen] for seen in told] == [["PENDING (Priority)", "PENDING (Resources)",
                                                               "RUNNING"]] * 3  # fmt: skip
    assert host.polls <= 6  # one query a round serves the three waiters


async def test_await_state_on_another_loop_says_how_a_job_ended_before_the_state():
    import pytest

    from offload import JobFailedError

    failed = JobStatus(JobState.FAILED, "NonZeroExitCode", exit_code=3)
    host = Polled(b"starting\nboom\n", RESOURCES, failed)
    with pytest.raises(JobFailedError, match=r"ended FAILED \(NonZeroExitCode\), exit code 3 before it was RUNNING"
                       ) as err:  # fmt: skip
        await job(host).await_state(JobState.RUNNING, timeout=5)
    assert (err.value.state, err.value.exit_code, err.value.log_tail) == ("FAILED", 3, "starting\nboom")
    ended = await job(Polled(b"", RESOURCES, failed)).await_state(JobState.RUNNING, or_end=True, timeout=5)
    assert ended == failed  # or_end: the end is an answer, not an error


def test_wait_for_state_that_times_out_names_the_last_state_seen():
    import pytest

    told = []
    with pytest.raises(TimeoutError, match=r"did not become RUNNING within 0.3 s: it is PENDING \(Resources\)"):
        job(Polled(b"", PRIORITY, RESOURCES)).wait_for_state(JobState.RUNNING, timeout=0.3, on_change=told.append)
    assert told == [PRIORITY, RESOURCES]
