"""offload.retry: one policy for every loop that asks again, checked on a fake clock (nothing sleeps here)."""

from __future__ import annotations

import pytest

import offload
from offload.retry import RetryPolicy


class FakeTime:
    """A clock that moves only when the code under test sleeps, and the pauses it slept."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def start(self, **policy: float) -> offload.Retry:
        """A loop under a policy without jitter, on this clock."""
        return RetryPolicy(jitter=0.0, **policy).start(clock=self.clock, sleep=self.sleep)


def no_jitter(policy: RetryPolicy) -> list[float]:
    return [policy.pause(n, rand=lambda: 0.0) for n in range(1, 9)]


def test_pauses_grow_by_the_factor_up_to_the_cap():
    policy = RetryPolicy(first=0.5, factor=2.0, cap=30.0)
    assert no_jitter(policy) == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.nominal(10**6) == 30.0  # a loop that retries for months neither overflows nor grows past it
    assert no_jitter(RetryPolicy(first=2.0, factor=1.0, cap=2.0)) == [2.0] * 8


def test_jitter_only_shortens_a_pause_within_its_fraction():
    policy = RetryPolicy(first=1.0, factor=2.0, cap=8.0, jitter=0.5)
    for n in range(1, 8):
        nominal = policy.nominal(n)
        assert policy.pause(n, rand=lambda: 0.0) == nominal
        assert policy.pause(n, rand=lambda: 0.999999) == pytest.approx(nominal * 0.5, rel=1e-5)
        drawn = {policy.pause(n) for _ in range(200)}
        assert all(nominal * 0.5 <= p <= nominal <= 8.0 for p in drawn)
        assert len(drawn) > 100  # spread: clients of one login node do not come back in step
    full = RetryPolicy(first=4.0, cap=4.0, jitter=1.0)
    assert min(full.pause(1) for _ in range(500)) < 0.5  # full jitter: anywhere from no pause to the whole
    assert RetryPolicy(first=3.0, cap=3.0, jitter=0.0).pause(1) == 3.0


@pytest.mark.parametrize(
    "bad",
    [dict(first=-1.0), dict(first=5.0, cap=1.0), dict(factor=0.5), dict(jitter=1.5), dict(attempts=0)],
)
def test_a_policy_that_makes_no_sense_is_refused(bad):
    with pytest.raises(ValueError, match="retry policy"):
        RetryPolicy(**bad)


async def test_call_gives_up_after_its_attempts_and_raises_the_last_error():
    fake, tries, said = FakeTime(), [], []

    async def work() -> str:
        tries.append(fake.now)
        raise ConnectionError(f"try {len(tries)}")

    policy = RetryPolicy(first=1.0, factor=2.0, cap=3.0, jitter=0.0, attempts=4)
    with pytest.raises(ConnectionError, match="try 4"):
        await policy.call(work, lambda exc: True, lambda exc, pause: said.append((str(exc), pause)),
                          clock=fake.clock, sleep=fake.sleep)  # fmt: skip
    assert fake.slept == [1.0, 2.0, 3.0]
    assert said == [("try 1", 1.0), ("try 2", 2.0), ("try 3", 3.0)]  # the caller's line, before each pause


async def test_call_gives_up_when_the_next_try_would_begin_after_within():
    fake, tries = FakeTime(), []

    async def work() -> None:
        tries.append(fake.now)
        fake.now += 1.0  # each try takes a second
        raise TimeoutError

    policy = RetryPolicy(first=1.0, factor=2.0, cap=60.0, jitter=0.0, within=10.0)
    with pytest.raises(TimeoutError):
        await policy.call(work, lambda exc: True, clock=fake.clock, sleep=fake.sleep)
    # tries at 0, 2, 5: after the third (ending at 6) a pause of 4 would start the next at 10 <= 10; the fourth
    # ends at 11, and a pause of 8 would begin the fifth past 10 s
    assert [t - 100.0 for t in tries] == [0.0, 2.0, 5.0, 10.0]
    assert fake.slept == [1.0, 2.0, 4.0]


async def test_call_returns_once_it_works_and_passes_other_errors_through_at_once():
    fake, tries = FakeTime(), []

    async def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError
        return "done"

    policy = RetryPolicy(first=0.5, jitter=0.0, attempts=5)
    assert await policy.call(flaky, lambda exc: isinstance(exc, ConnectionError),
                             clock=fake.clock, sleep=fake.sleep) == "done"  # fmt: skip
    assert fake.slept == [0.5, 1.0]

    async def refused() -> None:
        raise offload.HostKeyError("not trusted")

    with pytest.raises(offload.HostKeyError):
        await policy.call(refused, lambda exc: not isinstance(exc, offload.HostKeyError),
                          clock=fake.clock, sleep=fake.sleep)  # fmt: skip
    assert fake.slept == [0.5, 1.0]  # not retried: no pause


async def test_a_loop_that_goes_on_after_success_counts_failures_in_a_row():
    fake = FakeTime()
    retry = fake.start(first=2.0, factor=2.0, cap=60.0, attempts=3)
    assert retry.failed() == 2.0
    await retry.wait()
    assert retry.failed() == 4.0
    retry.reset()  # a read worked
    assert retry.failed() == 2.0  # a first failure again
    assert retry.failed() == 4.0
    assert retry.failed() is None  # the third in a row: give up
    assert fake.slept == [2.0]


async def test_within_counts_from_the_last_reset():
    fake = FakeTime()
    retry = fake.start(first=2.0, factor=1.0, cap=2.0, within=5.0)
    for _ in range(2):
        assert retry.failed() == 2.0
        await retry.wait()
    assert retry.failed() is None  # 4 s quiet, and 2 more would pass 5
    retry.reset()
    fake.now += 1.0
    assert retry.failed() == 2.0


def test_the_policy_is_offloads_public_api():
    assert offload.RetryPolicy is RetryPolicy and "RetryPolicy" in offload.__all__
