"""When a job would start on a site: the scheduler's own plan, corrected by what this machine has learnt of it.

The ``estimate`` placement policy ranks sites by it, and a raced job's attempt that waits (``Resources``,
``Priority``) is given until its expected start, plus the placement's patience, before the next site gets an
attempt too. Two things make the scheduler's word usable across sites:

* **Cheap.** A scheduler plans a job in one call that submits nothing (SLURM: ``sbatch --test-only``); the
  answer is kept a minute per site and job shape, so ranking, then submitting, then ranking the next job of the
  same shape asks once.
* **Corrected.** Schedulers plan from time limits, and most jobs end well before theirs, so one site's plans run
  long while another's (one with a tight backfill, or one whose users ask for what they use) hold. Every attempt
  that starts teaches the site's records how long it really waited against what its scheduler said; the next
  plan is scaled by the median ratio of that site's last :data:`LEARN_FROM` starts (once there are
  :data:`MIN_LEARNT`), on a scale that adds :data:`_SMOOTH` seconds to both, so short waits are corrected by
  their difference and long ones by their ratio.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from offload.context import SiteContext
from offload.records import JobRecords
from offload.spec import JobSpec

ASK_EVERY = 60.0  # seconds an answer is kept per (site, job shape): at most one plan a minute each
LEARN_FROM = 20  # a site's last starts that correct its plans
MIN_LEARNT = 3  # starts needed before a site's plans are corrected
_SMOOTH = 30.0  # seconds added to plan and wait before their ratio is taken


@dataclass(frozen=True)
class ExpectedStart:
    """When a job is expected to start on one site if it is submitted now.

    ``seconds``: from now, corrected by the site's record (None: its scheduler would not say); ``said``: the
    scheduler's own plan; ``refused``: its words if it would refuse the job as asked; ``note``: for people."""

    seconds: float | None
    said: float | None = None
    refused: str = ""
    note: str = ""


class StartEstimates:
    """One site's plans: asked of its scheduler, kept a minute per job shape, corrected by its records."""

    def __init__(self, ctx: SiteContext) -> None:
        self._ctx = ctx
        self._kept: dict[str, tuple[float, ExpectedStart]] = {}
        self._asking: dict[str, asyncio.Future[ExpectedStart]] = {}  # plans being asked: one call per shape

    async def expected(self, spec: JobSpec) -> ExpectedStart:
        """When ``spec`` would start if submitted now. A site that does not answer raises the transport's
        :class:`~offload.errors.OffloadError`, as its ``sinfo`` would; a scheduler without plans gives
        ``ExpectedStart(None)``."""
        shape = repr(spec.resources)
        kept = self._kept.get(shape)
        if kept is not None and time.monotonic() - kept[0] < ASK_EVERY:
            return kept[1]
        if shape not in self._asking:  # jobs ranked at once share one call, as they share its answer after
            asking = self._asking[shape] = asyncio.ensure_future(self._ask(shape, spec))
            asking.add_done_callback(lambda done: self._asked(shape, done))
        return await asyncio.shield(self._asking[shape])

    def _asked(self, shape: str, done: asyncio.Future[ExpectedStart]) -> None:
        self._asking.pop(shape, None)
        if not done.cancelled():
            done.exception()  # retrieved here too: every caller that waited for it may have been cancelled

    async def _ask(self, shape: str, spec: JobSpec) -> ExpectedStart:
        now = time.monotonic()
        plan = await self._ctx.scheduler.estimate_start(self._ctx.transport, spec)
        if plan is None:
            answer = ExpectedStart(None, note=f"{self._ctx.config.scheduler} does not plan ahead")
        elif plan.seconds is None:
            answer = ExpectedStart(None, refused=plan.refused, note=f"{self._ctx.config.scheduler} would not say when")
        else:
            seconds, note = corrected(self._ctx.records, self.name, plan.seconds)
            where = f" {plan.where}" if plan.where else ""
            answer = ExpectedStart(seconds, plan.seconds, note=f"{self._ctx.config.scheduler} plans it in "
                                   f"{_span(plan.seconds)}{where}{note}")  # fmt: skip
        self._kept[shape] = (now, answer)
        return answer

    @property
    def name(self) -> str:
        return self._ctx.name

    def learn(self, said: float, waited: float) -> None:
        """One of this site's jobs started ``waited`` seconds after its submission, where its scheduler had
        planned ``said``: kept in this machine's records, for the next plans of the site."""
        self._ctx.records.learn_start(self.name, said, waited)


def corrected(records: JobRecords, site: str, said: float) -> tuple[float, str]:
    """``said`` seconds of a plan of ``site``'s, corrected by its learnt starts; and a note on how, for people."""
    learnt = records.starts_learnt(site, LEARN_FROM)
    if len(learnt) < MIN_LEARNT:
        return said, ""
    ratio = statistics.median((waited + _SMOOTH) / (planned + _SMOOTH) for planned, waited in learnt)
    seconds = max(0.0, (said + _SMOOTH) * ratio - _SMOOTH)
    learnt_from = f"its waits were {ratio:.2f} times its plans over its last {len(learnt)} starts"
    return seconds, f"; expected in {_span(seconds)} ({learnt_from})"


def _span(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
