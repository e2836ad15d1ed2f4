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

    async def finished(self, ref):
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
        async def finished(self, ref):
            import asyncio

            await asyncio.sleep(3600)

        async def status(self, ref, refresh):
            return JobStatus(JobState.PENDING, reason="Resources")

    import pytest

    with pytest.raises(TimeoutError, match=r"did not end within 0.1 s: it is PENDING \(Resources\)"):
        await job(Queued(b"", JobState.PENDING))._finished(0.1, check=False)


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
