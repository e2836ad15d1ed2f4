"""One retry policy for every loop that asks again: growing pauses, a cap, jitter, and a limit.

A site's login node serves many clients at once: every Airflow worker and triggerer, every hub, every Dask
client and CLI of its users. When it reboots or its sshd restarts they all lose their connection in the same
second, and pauses that grow the same way for all of them would bring them back in the same second too, try
after try. So each pause is drawn at random below its nominal length (jitter): the clients spread out, and the
login node sees a trickle instead of a wave. The same holds, at a smaller scale, for the triggers of one
triggerer and for processes that share a locked SQLite file.

A :class:`RetryPolicy` is data (frozen: the same policy may serve any number of loops at once); one
:class:`Retry` follows one loop, counting its failures and the time since it started. Two ways to use it:
:meth:`RetryPolicy.call` for "run this until it works or the policy gives up", and :meth:`RetryPolicy.start`
for loops that go on after a success (a log follower's failures in a row: :meth:`Retry.reset` on success).
Clock, sleep and randomness are a seam: tests pass their own, and nothing here sleeps for real in them.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]


@dataclass(frozen=True)
class RetryPolicy:
    """How long to pause between tries, and when to stop trying.

    The pause after the ``n``-th failure in a row is ``first * factor ** (n - 1)``, never more than ``cap``,
    then drawn uniformly from ``[pause * (1 - jitter), pause]``. Jitter only ever shortens a pause, so ``cap``
    is a hard bound and a limit by time is never stretched; the price is that a policy limited by ``attempts``
    gives up a little sooner than its nominal pauses add up to (on average by ``jitter / 2`` of them).
    ``jitter=1`` is "full jitter" (anything from no pause to the whole one), which spreads clients best but
    may leave nearly no pause at all; the default of one half keeps at least half of every pause.

    ``attempts`` limits the tries in all (the first one included); ``within`` the seconds from the first try
    (or from the last :meth:`Retry.reset`) after which no new try begins: a pause that would end later is not
    taken. None: no limit of that kind (with neither, the loop retries until its caller stops it).
    """

    first: float = 1.0
    factor: float = 2.0
    cap: float = 60.0
    jitter: float = 0.5
    attempts: int | None = None
    within: float | None = None

    def __post_init__(self) -> None:
        if self.first < 0 or self.cap < self.first or self.factor < 1:
            raise ValueError(f"a retry policy needs 0 <= first <= cap and factor >= 1: {self}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"a retry policy's jitter is a fraction from 0 to 1, got {self.jitter}")
        if self.attempts is not None and self.attempts < 1:
            raise ValueError(f"a retry policy allows at least one attempt, got {self.attempts}")

    def nominal(self, failures: int) -> float:
        """The pause after ``failures`` failures in a row (1: after the first), before jitter."""
        pause = self.first
        for _ in range(failures - 1):  # grown step by step: a loop that retries for months never overflows
            if pause >= self.cap or pause == 0 or self.factor == 1:
                break
            pause *= self.factor
        return min(self.cap, pause)

    def pause(self, failures: int, rand: Callable[[], float] = random.random) -> float:
        """The jittered pause after ``failures`` failures in a row; ``rand()`` is uniform in [0, 1)."""
        nominal = self.nominal(failures)
        return nominal * (1 - self.jitter * rand())

    def start(
        self, *, clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep, rand: Callable[[], float] = random.random
    ) -> Retry:
        """Follow one loop with this policy, from now."""
        return Retry(self, clock=clock, sleep=sleep, rand=rand)

    async def call(
        self,
        work: Callable[[], Awaitable[T]],
        retry_if: Callable[[Exception], bool],
        on_retry: Callable[[Exception, float], object] | None = None,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> T:
        """``await work()`` until it returns; an exception ``retry_if`` accepts is tried again after a pause
        (``on_retry(exc, pause)`` first: the caller's log line), until the policy gives up and it is raised as it
        is. Any other exception, and cancellation, go through at once."""
        retry = self.start(clock=clock, sleep=sleep, rand=rand)
        while True:
            try:
                return await work()
            except Exception as exc:
                if not retry_if(exc) or retry.failed() is None:
                    raise
                if on_retry is not None:
                    on_retry(exc, retry.next_pause)
            await retry.wait()


class Retry:
    """One loop under a :class:`RetryPolicy`: its failures in a row, and when it started."""

    def __init__(self, policy: RetryPolicy, *, clock: Clock, sleep: Sleep, rand: Callable[[], float]) -> None:
        self.policy = policy
        self._clock, self._sleep, self._rand = clock, sleep, rand
        self.failures = 0
        self.next_pause = 0.0
        self._since = clock()

    def failed(self) -> float | None:
        """Count a failed try. The pause before the next one (also kept in ``next_pause``), or None: the policy
        gives up (its attempts are spent, or the next try would begin after ``within``)."""
        policy = self.policy
        self.failures += 1
        if policy.attempts is not None and self.failures >= policy.attempts:
            return None
        pause = policy.pause(self.failures, self._rand)
        if policy.within is not None and self._clock() - self._since + pause > policy.within:
            return None
        self.next_pause = pause
        return pause

    async def wait(self) -> None:
        """Pause for the time :meth:`failed` drew."""
        await self._sleep(self.next_pause)

    def reset(self) -> None:
        """A try worked: the next failure is a first one again, and ``within`` counts from now."""
        self.failures = 0
        self.next_pause = 0.0
        self._since = self._clock()
