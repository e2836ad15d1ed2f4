"""One job's attempts on several sites, until one starts and is claimed: what :class:`offload.SiteGroup` does
with ``policy="race"`` (several attempts at once) and ``policy="failover"`` (one at a time).

The payload runs exactly once, whatever happens to the client:

1. The placement is recorded (:class:`~offload.records.PlacementRecord`) before anything is submitted, and each
   attempt's directory is recorded before that attempt is submitted; every attempt waits on its node for its
   claim (:mod:`offload.claims`) before the payload.
2. The first attempt seen RUNNING is the winner: the record names it as being claimed, every other attempt is
   released (so it cannot run the payload even if it starts meanwhile, or if its site is out of reach and its
   cancel does not arrive), then it is claimed, then the others are cancelled. Releasing the others *before* the
   claim is what makes two watchers of one placement safe (a trigger Airflow runs twice, two resumes at once):
   a watcher claims only after it released every other attempt, and one that finds another attempt already
   claimed takes that one as the winner, so no two attempts can both hold a claim.
3. An attempt that will never start as it is (a refusal at submission, or a waiting reason its scheduler says
   never clears, :attr:`JobStatus.stuck`) is released and cancelled, and the next feasible site gets one. An
   attempt still waiting for a reason that may clear (``Resources``, ``Priority``) past its due time (its
   expected start, :mod:`offload.estimates`, plus the placement's patience) is *overdue*: it no longer counts
   against the width, so the next site gets an attempt too, but it keeps its place in its own queue.
4. A placement can be handed to another process (:meth:`Placement.to_json`, :meth:`Placement.from_json`):
   the attempts are submitted in one process and claimed in another, as Airflow's deferred tasks do (its
   triggerer claims), or adopted from the site's own queue (:meth:`Placement.adopt`: a retry finds the attempts
   of the try its worker died in by their name). The decisions live in the attempts' directories on the sites,
   so the process that claims needs no record of the one that submitted.
5. A client killed at any point leaves a record that :func:`resume` finishes: it claims the attempt the record
   names (or reads that the attempt released itself), finds attempts whose id it never learnt from their
   directories, and goes on as above: with the attempts that exist, and new ones on the sites not tried yet if
   the spec could be recorded (a spec with secrets never is: then only the attempts that exist can run it). An
   attempt nobody claims releases itself after its gate's wait, so nothing holds nodes forever either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets as _secrets
import time
from collections.abc import Callable, Sequence

from offload import _loop, claims
from offload.claims import CLAIM, RELEASE, Gate
from offload.errors import ConfigError, OffloadError, SubmissionError
from offload.jobfiles import JOB_ID
from offload.jobs import Job, JobRef, JobState, JobStatus
from offload.records import Attempt, JobRecords, PlacementRecord
from offload.site import Site, load_site
from offload.spec import JobSpec, spec_from_json, spec_to_json

log = logging.getLogger("offload.placement")

Say = Callable[[str], None]  # told each step of a placement, as a line for people
SpecFor = JobSpec | Callable[[Site], JobSpec]  # one spec for every site, or a function that makes each site's


class Placement:
    """The attempts of one placement and their record. Made by :meth:`start` (a new placement),
    :func:`resume` (a recorded one), :meth:`from_json` (one handed over) or :meth:`adopt` (attempts found on the
    sites); :meth:`arun` returns the claimed attempt's :class:`Job`."""

    def __init__(self, record: PlacementRecord, sites: dict[str, Site], records: JobRecords,
                 say: Say | None = None) -> None:  # fmt: skip
        self.record = record
        self._sites = sites
        self._records = records
        self._say = say or (lambda line: log.info("%s", line))
        self._jobs: dict[str, Job] = {}  # by site, the attempts that are queued
        # the sites whose attempt this process submitted or saw waiting: when one starts, its wait is known
        self._watched: set[str] = set()
        # the spec of new attempts: the caller's (one, or one made per site), or the record's (None if it has
        # secrets or is made per site: never written down)
        self._spec: SpecFor | None = spec_from_json(record.spec) if record.spec else None

    @property
    def id(self) -> str:
        return self.record.id

    @classmethod
    def start(cls, spec: SpecFor, sites: Sequence[Site], *, width: int, wait: int,
              records: JobRecords, patience: float | None = None, say: Say | None = None) -> Placement:  # fmt: skip
        """A new placement of ``spec`` (or of the spec a function makes for each site: where the job's command
        or paths differ by site) over ``sites`` (feasible, best first), ``width`` attempts at a time; an attempt
        is overdue ``patience`` seconds after its expected start (None: never)."""
        if not isinstance(width, int) or width < 1:
            raise ConfigError(f"a race's width is how many sites get an attempt at once, at least 1; got {width!r}")
        first = spec(sites[0]) if callable(spec) and sites else spec
        name = first.name if isinstance(first, JobSpec) else None
        recorded = spec_to_json(spec) if isinstance(spec, JobSpec) else None
        record = PlacementRecord(f"p{_secrets.token_hex(6)}", name, "placing", (), spec=recorded,
                                 next_sites=tuple(site.name for site in sites), width=width, wait=wait,
                                 patience=patience)  # fmt: skip
        placement = cls(record, {site.name: site for site in sites}, records, say)
        placement._spec = spec
        placement._save()  # before any attempt is submitted
        return placement

    # -- the record ---------------------------------------------------------------------------------------

    def _save(self, **changes: object) -> None:
        self.record = dataclasses.replace(self.record, **changes)  # type: ignore[arg-type]
        self._records.save_placement(self.record)

    def _attempt(self, site: str, **changes: object) -> None:
        attempts = tuple(dataclasses.replace(a, **changes) if a.site == site else a  # type: ignore[arg-type]
                         for a in self.record.attempts)  # fmt: skip
        self._save(attempts=attempts)

    def _live(self) -> list[Attempt]:
        return [a for a in self.record.attempts if a.state == "queued"]

    def _counted(self) -> int:
        """The attempts that count against the width: those queued and not overdue."""
        return sum(1 for a in self._live() if not a.overdue)

    # -- the race -----------------------------------------------------------------------------------------

    @_loop.on_loop
    async def asubmit_attempts(self) -> None:
        """Submit the first attempts (up to the width) and return once they are queued, without waiting for one
        to start: for a caller that hands the placement to another process to claim (:meth:`to_json`)."""
        await self._fill()

    submit_attempts = _loop.blocking(asubmit_attempts)

    @_loop.on_loop
    async def arun(self, *, abandon: bool = True) -> Job:
        """Submit (up to the width), watch, claim the first attempt that starts, release the others; return the
        claimed attempt. Interrupted, it releases and cancels every attempt it made before it stops; with
        ``abandon=False`` it leaves them as they are, for another watcher to go on with (a trigger whose
        triggerer stops: the next triggerer runs it again)."""
        try:
            return await self._run()
        except (asyncio.CancelledError, KeyboardInterrupt):
            if abandon:
                _loop.keep(self._abandon("the placement was interrupted"))
            raise

    run = _loop.blocking(arun)

    @_loop.on_loop
    async def acancel(self, why: str = "the placement was cancelled") -> None:
        """Give the placement up: release and cancel every attempt that waits (none can run the payload
        afterwards), and cancel the one claimed, if any."""
        await self._abandon(why)

    cancel = _loop.blocking(acancel)

    # -- handing a placement over -------------------------------------------------------------------------

    def to_json(self) -> str:
        """What another process needs to claim this placement's attempts (:meth:`from_json`): its id, name,
        attempts and claim wait. Not the spec: that process never submits, so the secrets stay here."""
        record = dataclasses.replace(self.record, spec=None, next_sites=())
        return json.dumps({"id": record.id, "name": record.name, "state": record.state, "claiming": record.claiming,
                           "width": record.width, "wait": record.wait,
                           "attempts": [dataclasses.asdict(a) for a in record.attempts]})  # fmt: skip

    @classmethod
    def from_json(cls, text: str, *, records: JobRecords | None = None, say: Say | None = None) -> Placement:
        """The placement :meth:`to_json` wrote, on this machine's sites of the same names, ready to :meth:`arun`
        (which claims among its attempts and submits no new one). It is recorded here too, so ``offload
        placements`` on this machine shows it."""
        try:
            data = json.loads(text)
            attempts = tuple(Attempt(**a) for a in data["attempts"])
            record = PlacementRecord(data["id"], data["name"], data["state"], attempts, data.get("claiming"),
                                     width=data["width"], wait=data["wait"])  # fmt: skip
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"not a placement handed over by offload ({exc}): {text[:200]!r}") from None
        sites = {name: load_site(name) for name in dict.fromkeys(a.site for a in attempts)}
        placement = cls(record, sites, records or JobRecords(), say)
        placement._save()
        return placement

    @classmethod
    def adopt(cls, jobs: Sequence[Job], *, name: str | None = None, wait: int = claims.DEFAULT_WAIT,
              records: JobRecords | None = None, say: Say | None = None) -> Placement:  # fmt: skip
        """A placement of attempts found on the sites (e.g. ``Site.find(name)`` on each: those a process that
        died had submitted), to finish with :meth:`arun`: the one already claimed, if any, stays the winner;
        otherwise the first to start is claimed. At most one per site (the newest); it submits none."""
        newest: dict[str, Job] = {}
        for job in jobs:
            newest.setdefault(job.site.name, job)
        attempts = tuple(Attempt(site, job.ref.jobdir, job.id, state="queued", submitted_at=time.time())
                         for site, job in newest.items())  # fmt: skip
        record = PlacementRecord(f"p{_secrets.token_hex(6)}", name, "placing", attempts, width=len(attempts),
                                 wait=wait)  # fmt: skip
        placement = cls(record, {job.site.name: job.site for job in newest.values()}, records or JobRecords(), say)
        placement._jobs.update(newest)
        placement._save()
        return placement

    async def _run(self) -> Job:
        await self._fill()
        interval = min((site.config.poll_interval for site in self._sites.values()), default=5.0)
        while True:
            live = self._live()
            if not live:
                self._save(state="failed")
                reasons = "\n  ".join(f"{a.site}: {a.reason}" for a in self.record.attempts)
                more = "" if self._spec is not None or not self.record.next_sites else (
                    f"\n  (not tried: {', '.join(self.record.next_sites)}; the job has secrets or a spec made per "
                    "site, which offload never writes down, so only its first client could submit it there: submit "
                    "it again)")  # fmt: skip
                raise SubmissionError(f"placement {self.id}: no site ran the job:\n  {reasons}{more}")
            statuses = await asyncio.gather(*(self._status(a) for a in live))
            for attempt, status in zip(live, statuses, strict=True):
                if status is None:
                    continue  # its site is out of reach this round: the attempt may still win later
                if status.state is JobState.PENDING:
                    self._watched.add(attempt.site)
                if status.state is JobState.RUNNING:
                    job = await self._claim(attempt)
                    if job is not None:
                        return job
                elif status.state.is_terminal:
                    if await self._decision(attempt) == CLAIM:  # claimed by another watcher, and it ran: the winner
                        self._attempt(attempt.site, state="claimed")
                        self._save(state="placed")
                        return self._job(attempt)
                    self._attempt(attempt.site, state="released", reason=f"ended before it started: "
                                  f"{status.describe()}")  # fmt: skip
                    self._say(f"{attempt.site}: attempt {attempt.job_id} ended before it started "
                              f"({status.describe()})")  # fmt: skip
                elif status.stuck:
                    self._say(f"{attempt.site}: attempt {attempt.job_id} will never start ({status.reason}): "
                              "moving on")  # fmt: skip
                    await self._release(attempt, f"would never start: {status.reason}")
                elif self._overdue(attempt):
                    self._attempt(attempt.site, overdue=True, reason=f"overdue: still {status.describe()} "
                                  f"{time.time() - attempt.submitted_at:.0f} s after its submission")  # fmt: skip
                    self._say(f"{attempt.site}: attempt {attempt.job_id} is past its expected start (still "
                              f"{status.describe()}): {self.record.next_sites[0]} gets an attempt too; this one "
                              "keeps its place, and whichever starts first runs the job")  # fmt: skip
            await self._fill()
            await asyncio.sleep(interval)

    def _overdue(self, attempt: Attempt) -> bool:
        """Whether a waiting attempt has just become overdue: past its due time, with a site left to try."""
        due = attempt.due is not None and time.time() > attempt.due
        return due and not attempt.overdue and bool(self.record.next_sites) and self._spec is not None

    async def _fill(self) -> None:
        """Submit attempts to the next sites until ``width`` count or no site is left; a site that refuses is
        passed over, its refusal kept."""
        while self._spec is not None and self.record.next_sites and self._counted() < self.record.width:
            take = self.record.next_sites[: self.record.width - self._counted()]
            self._save(next_sites=self.record.next_sites[len(take) :])
            await asyncio.gather(*(self._submit(self._sites[name]) for name in take))

    def _spec_for(self, site: Site) -> JobSpec:
        assert self._spec is not None
        return self._spec(site) if callable(self._spec) else self._spec

    async def _submit(self, site: Site) -> None:
        spec = self._spec_for(site)
        jobdir = f"{await site.aworkdir()}/jobs/{spec.name or 'job'}-{self.id}-{site.name}"
        self._save(attempts=(*self.record.attempts, Attempt(site.name, jobdir)))  # before it is submitted
        planned, due = await self._due(site, spec)
        try:
            job = await site.asubmit(spec, gate=Gate(jobdir, self.record.wait))
        except SubmissionError as exc:  # refused there (a limit, an account): the next site may take it
            self._attempt(site.name, state="refused", reason=f"refused: {exc.scheduler_message or exc}")
            self._say(f"{site.name}: refused the job ({exc.scheduler_message or exc})")
            return
        self._jobs[site.name] = job
        self._watched.add(site.name)
        self._attempt(site.name, state="queued", job_id=job.id, submitted_at=time.time(), planned=planned, due=due)
        expected = "" if due is None else f", overdue after {due - time.time():.0f} s"
        self._say(f"{site.name}: attempt {job.id} queued{expected}")

    async def _due(self, site: Site, spec: JobSpec) -> tuple[float | None, float | None]:
        """What ``site``'s scheduler plans for the attempt about to be submitted (seconds, None if it makes no
        plan), and when the attempt will be overdue (None: never; the patience alone where there is no plan).
        The plan is the one ranking just asked for (kept a minute): no extra call."""
        if self.record.patience is None:
            return None, None
        try:
            expected = await site.aexpected_start(spec)
        except OffloadError as exc:
            log.warning("placement %s: %s did not say when it would start the job (%s)", self.id, site.name, exc)
            return None, time.time() + self.record.patience
        return expected.said, time.time() + (expected.seconds or 0.0) + self.record.patience

    async def _status(self, attempt: Attempt) -> JobStatus | None:
        try:
            return await self._job(attempt).astatus(refresh=True)
        except OffloadError as exc:
            log.warning("placement %s: %s did not answer (%s); asking again at the next round", self.id,
                        attempt.site, exc)  # fmt: skip
            return None

    def _job(self, attempt: Attempt) -> Job:
        job = self._jobs.get(attempt.site)
        if job is None:
            assert attempt.job_id is not None
            job = self._jobs[attempt.site] = Job(self._sites[attempt.site], JobRef(attempt.job_id, attempt.jobdir),
                                                 name=self.record.name)  # fmt: skip
        return job

    async def _decision(self, attempt: Attempt) -> str:
        """``attempt``'s decision as it stands ('' if none, or its site did not answer)."""
        try:
            return await claims.decision(self._sites[attempt.site].transport, attempt.jobdir)
        except OffloadError:
            return ""

    async def _claim(self, attempt: Attempt) -> Job | None:
        """Claim ``attempt`` (named in the record first), after releasing every other attempt; then cancel the
        others. None if it was released first (it waited longer than its gate's wait, or another watcher of
        this placement claimed a different one first): it never ran, and the race goes on."""
        if await self._decision(attempt) == RELEASE:  # released already: the others are left untouched
            self._attempt(attempt.site, state="released", reason="it was released before its claim came")
            return None
        self._save(claiming=f"{attempt.site}/{attempt.job_id}")
        others = [a for a in self._live() if a.site != attempt.site]
        decided = await asyncio.gather(*(self._decide(a, RELEASE) for a in others))
        claimed = next((a for a, word in zip(others, decided, strict=True) if word == CLAIM), None)
        if claimed is not None:  # another watcher of this placement claimed that one first: it is the winner
            log.info("placement %s: %s's attempt %s was claimed by another watcher first", self.id, claimed.site,
                     claimed.job_id)  # fmt: skip
            attempt, others = claimed, [a for a in others if a.site != claimed.site] + [attempt]
            await self._decide(others[-1], RELEASE)
            self._save(claiming=f"{attempt.site}/{attempt.job_id}")
        decision = await claims.decide(self._sites[attempt.site].transport, attempt.jobdir, CLAIM)
        if decision != CLAIM:
            self._attempt(attempt.site, state="released", reason="it was released before its claim came")
            self._save(claiming=None)
            for other in others:  # released above: none of them can run the payload now
                self._attempt(other.site, state="released", reason=f"released while {attempt.site} was claimed")
            await asyncio.gather(*(self._cancel(a) for a in others))
            return None
        self._attempt(attempt.site, state="claimed")
        if attempt.planned is not None and attempt.site in self._watched:  # what its start teaches the site
            self._sites[attempt.site].learn_start(attempt.planned, time.time() - attempt.submitted_at)
        self._say(f"{attempt.site}: attempt {attempt.job_id} started first: claimed, its payload runs")
        await asyncio.gather(*(self._cancel_released(a, f"{attempt.site} started it first") for a in others))
        self._save(state="placed")
        return self._job(attempt)

    async def _decide(self, attempt: Attempt, word: str) -> str:
        """Write ``word`` as ``attempt``'s decision unless one is there; the decision that holds ('' if its site
        did not answer: a release that did not arrive is made by the attempt itself, after its gate's wait)."""
        try:
            return await claims.decide(self._sites[attempt.site].transport, attempt.jobdir, word)
        except OffloadError as exc:
            log.warning("placement %s: could not write %s for %s's attempt %s now (%s)", self.id, word, attempt.site,
                        attempt.job_id, exc)  # fmt: skip
            return ""

    async def _cancel(self, attempt: Attempt) -> None:
        with contextlib.suppress(OffloadError):
            await self._sites[attempt.site].acancel([self._job(attempt)], timeout=30)

    async def _cancel_released(self, attempt: Attempt, reason: str) -> None:
        """Cancel an attempt released just before the claim (its release is on the site already: no second
        round trip to write it)."""
        self._attempt(attempt.site, state="released", reason=reason)
        await self._cancel(attempt)
        self._say(f"{attempt.site}: attempt {attempt.job_id} released and cancelled ({reason})")

    async def _release(self, attempt: Attempt, reason: str) -> None:
        """Release ``attempt`` (it can no longer run the payload), then cancel it."""
        site = self._sites[attempt.site]
        self._attempt(attempt.site, state="released", reason=reason)
        try:
            decision = await claims.decide(site.transport, attempt.jobdir, RELEASE)
            if decision == CLAIM:  # only a claim this placement made and lost track of: never expected
                log.error("placement %s: %s's attempt %s was claimed earlier; leaving it", self.id, site.name,
                          attempt.job_id)  # fmt: skip
                return
            await site.acancel([self._job(attempt)], timeout=30)
        except OffloadError as exc:
            log.warning("placement %s: could not release %s's attempt %s now (%s); it releases itself within %s s "
                        "of starting and never runs the payload", self.id, site.name, attempt.job_id, exc,
                        self.record.wait)  # fmt: skip
        else:
            self._say(f"{site.name}: attempt {attempt.job_id} released and cancelled ({reason})")

    async def _abandon(self, why: str) -> None:
        """Stop the placement: release and cancel the attempts that wait, cancel one claimed a moment ago."""
        self._save(next_sites=())
        live = self._live()
        claimed = [self._job(a) for a in self.record.attempts if a.state == "claimed"]
        stops = [*(self._release(a, why) for a in live), *(job.site.acancel([job], timeout=30) for job in claimed)]
        await asyncio.gather(*stops, return_exceptions=True)
        self._save(state="failed")


async def resume(placement_id: str, *, records: JobRecords | None = None, say: Say | None = None) -> Job:
    """Finish a recorded placement whose client stopped (killed, or its machine restarted): return the claimed
    attempt's :class:`Job`. It claims no attempt twice: the one the record names as being claimed is claimed
    again (or found released), and the others race on as :class:`Placement` does."""
    records = records or JobRecords()
    record = records.placement(placement_id)
    if record is None:
        raise ConfigError(f"no placement {placement_id!r} in this machine's records ({records.path}): "
                          "'offload placements' lists them")  # fmt: skip
    sites = {name: load_site(name) for name in dict.fromkeys([*(a.site for a in record.attempts), *record.next_sites])}
    race = Placement(record, sites, records, say)
    if record.state == "placed":
        winner = next(a for a in record.attempts if a.state == "claimed")
        return race._job(winner)
    for attempt in record.attempts:  # an attempt whose id the client never learnt: its directory says
        if attempt.job_id is None and attempt.state == "planned":
            job_id = await _submitted_id(sites[attempt.site], attempt.jobdir)
            race._attempt(attempt.site, state="queued" if job_id else "refused", job_id=job_id,
                          reason="" if job_id else "never submitted (the client stopped first)")  # fmt: skip
    if record.claiming:
        site, _, job_id = record.claiming.partition("/")
        attempt = next(a for a in race.record.attempts if a.site == site and a.job_id == job_id)
        race._attempt(site, state="queued")
        job = await race._claim(attempt)
        if job is not None:
            return job
    race._save(state="placing")
    return await race.arun()


async def _submitted_id(site: Site, jobdir: str) -> str | None:
    """The job id the submit command wrote in ``jobdir`` (None: nothing was submitted from it)."""
    with contextlib.suppress(OffloadError):
        text = (await site.transport.read_file(f"{jobdir}/{JOB_ID}")).decode(errors="replace")
        ids = site.scheduler.ids_in(text)
        return ids[-1] if ids else None
    return None
