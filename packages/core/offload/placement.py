"""Placing a job on one of several sites: :class:`SiteGroup`, what ``site="a,b"`` or ``site="@gpu"`` gives.

A user with accounts on several centres names them all; offload picks the one where the job starts first, and
says why. The policy here is *first-fit*, from evidence that costs one scheduler call per site:

1. **Feasibility first.** A site that cannot run the job at all is skipped with its reason: the profile refuses
   the spec (``Site.validate``: resources, walltime syntax, GPU syntax, mounts, the image), the partition asked
   for does not exist there, or no node (or not enough nodes) has the GPUs the job needs on each. A site that
   does not answer is *unavailable*, never an error for the whole placement.
2. **Where it starts now.** Of the feasible sites, those with enough free nodes for the job right now (free GPUs
   and CPUs on available nodes, from the same one ``sinfo``/``qhost`` call ``offload sites gpus`` makes) come
   first, the one with the most free GPUs (then CPUs) first; the others follow in the order the user gave.
   When no site can start it now, that evidence cannot tell them apart: then each is asked when its scheduler
   plans to start it (:mod:`offload.estimates`, one more call each, kept a minute), and the soonest goes first.
3. **Failover at submission.** A site that refuses the submission (a QOS limit, an account it does not know)
   is passed over for the next, and its refusal is kept: if every site refuses, the error lists each reason.

With the default policy the job is submitted once, to one site: there is no duplicate to cancel, and the job
record is the chosen site's (``Job.site`` says which). The policies ``race`` (attempts on several sites at once,
the first to start runs the payload), ``failover`` (one attempt at a time, moved on when a site says it will
never start it, or when the attempt is overdue) and ``estimate`` (failover in the order of the schedulers' own
plans, :mod:`offload.estimates`: one more call per site, kept a minute) are :mod:`offload.race`'s, with the
claim that makes the payload run exactly once. The evidence and verdict of every site is
:meth:`SiteGroup.rank`'s answer, which ``offload sites rank`` prints (``--estimate``: with each plan).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from offload import _loop
from offload.claims import DEFAULT_WAIT
from offload.errors import ConfigError, OffloadError, SubmissionError
from offload.estimates import ExpectedStart
from offload.jobs import Job
from offload.profiles import load_profiles
from offload.race import Placement, Say, SpecFor, resume
from offload.records import JobRecords
from offload.schedulers.base import NodeResources
from offload.site import Site, load_site
from offload.spec import JobSpec

log = logging.getLogger("offload.placement")

POLICIES = ("first-fit", "estimate", "race", "failover")
DEFAULT_PATIENCE = 300  # seconds a racing attempt may wait past its expected start before the next site gets one


@dataclass(frozen=True)
class Verdict:
    """One site's answer for one job: whether it can run it at all, whether it could start it now, and the
    evidence (free and total GPUs of the nodes it would use) or the reason it cannot."""

    site: str
    feasible: bool
    starts_now: bool
    reason: str
    gpus_free: int = 0
    gpus: int = 0
    cpus_free: int = 0
    expected: ExpectedStart | None = None  # when its scheduler plans to start it, if asked (``estimate=True``)

    def describe(self) -> str:
        if not self.feasible:
            return f"skipped: {self.reason}"
        now = "can start now" if self.starts_now else "would wait"
        plan = f"; {self.expected.note}" if self.expected is not None and self.expected.note else ""
        return f"{now} ({self.gpus_free}/{self.gpus} GPUs, {self.cpus_free} CPUs free; {self.reason}{plan})"

    @property
    def expected_wait(self) -> float:
        """Seconds until it is expected to start, for ranking: the corrected plan where its scheduler gave one;
        else 0 if it can start now, and last (infinite) if not."""
        if self.expected is not None and self.expected.seconds is not None:
            return self.expected.seconds
        return 0.0 if self.starts_now else math.inf


class SiteGroup:
    """Several sites used as one: :meth:`submit` places each job where it starts first (see the module's doc).
    Get one with :func:`load_sites`; its :attr:`sites` are the shared :class:`Site` objects of each name."""

    def __init__(self, sites: Sequence[Site]) -> None:
        if not sites:
            raise ConfigError("a group of sites needs at least one site")
        self.sites = list(sites)
        self._placements: JobRecords | None = None

    def __repr__(self) -> str:
        return f"<SiteGroup {','.join(site.name for site in self.sites)}>"

    @property
    def name(self) -> str:
        return ",".join(site.name for site in self.sites)

    @_loop.on_loop
    async def arank(self, spec: SpecFor, *, estimate: bool = False) -> list[Verdict]:
        """Every site's verdict for ``spec``, best first: feasible before not, those that can start it now
        before those where it would wait (most free GPUs, then CPUs, first), then the order of the group.
        One scheduler call per site, made at once. ``spec`` may be a function giving the job as built for each
        site, where that differs (a Dask cluster's worker asks CPUs only where the scheduler reserves them).

        ``estimate``: also ask each scheduler when it plans to start the job (:meth:`Site.expected_start`, one
        more call per site, at the same time, kept a minute), and rank feasible sites by that, soonest first: a
        site whose scheduler would refuse the job is skipped with its words."""
        spec_for = spec if callable(spec) else (lambda site: spec)
        specs = [spec_for(site) for site in self.sites]
        if not all(isinstance(one, JobSpec) for one in specs):
            raise ConfigError(f"rank takes an offload.JobSpec, got {type(spec).__name__}")
        verdicts = await asyncio.gather(*(_judge(site, one, estimate)
                                          for site, one in zip(self.sites, specs, strict=True)))  # fmt: skip
        return self._ordered(verdicts, by_plan=estimate)

    def _ordered(self, verdicts: Sequence[Verdict], by_plan: bool) -> list[Verdict]:
        """Feasible first; then soonest planned start (``by_plan``), or those that can start now, most free GPUs
        (then CPUs) first; then the order of the group."""
        order = {site.name: i for i, site in enumerate(self.sites)}
        if by_plan:
            return sorted(verdicts, key=lambda v: (not v.feasible, v.expected_wait, not v.starts_now, order[v.site]))
        return sorted(verdicts, key=lambda v: (not v.feasible, not v.starts_now,
                                               -v.gpus_free if v.starts_now else 0,
                                               -v.cpus_free if v.starts_now else 0, order[v.site]))  # fmt: skip

    rank = _loop.blocking(arank)

    @_loop.on_loop
    async def achoose(self, spec: SpecFor) -> Site:
        """The site :meth:`submit` would send ``spec`` to first, for a caller that builds its job there itself
        (``offload jupyter``, whose job names its site); :class:`ConfigError` with every site's reason if none
        can run it."""
        verdicts = await self._planned_if_none_free(await self.arank(spec), spec)
        if not verdicts[0].feasible:
            raise ConfigError(f"no site of {self.name} can run this job:\n  " +
                              "\n  ".join(f"{v.site}: {v.reason}" for v in verdicts))  # fmt: skip
        log.info("chose %s: %s", verdicts[0].site, verdicts[0].describe())
        return next(site for site in self.sites if site.name == verdicts[0].site)

    choose = _loop.blocking(achoose)

    async def _planned_if_none_free(self, verdicts: Sequence[Verdict],
                                    spec: SpecFor) -> list[Verdict]:  # fmt: skip
        """First-fit's answer when no feasible site can start the job now, and free resources cannot tell them
        apart: the feasible sites in the order of their schedulers' plans (one plan each, kept a minute,
        :meth:`Site.expected_start`), those without one after, in the group's order."""
        feasible = [v for v in verdicts if v.feasible]
        if len(feasible) < 2 or any(v.starts_now for v in feasible):
            return list(verdicts)
        sites = {site.name: site for site in self.sites}

        async def planned(verdict: Verdict) -> Verdict:
            site = sites[verdict.site]
            if not verdict.feasible or verdict.expected is not None:
                return verdict
            try:
                expected = await site.aexpected_start(spec(site) if callable(spec) else spec)
            except OffloadError:  # no plan from it this time: it keeps its place after those with one
                return verdict
            if expected.refused:
                return Verdict(site.name, False, False, f"{site.config.scheduler} would refuse it: {expected.refused}")
            return dataclasses.replace(verdict, expected=expected)

        return self._ordered(await asyncio.gather(*(planned(v) for v in verdicts)), by_plan=True)

    @_loop.on_loop
    async def asubmit(self, spec: SpecFor, *, ranked: Sequence[Verdict] | None = None, policy: str = "first-fit",
                      width: int = 2, claim_wait: int = DEFAULT_WAIT, patience: float | None = DEFAULT_PATIENCE,
                      say: Say | None = None) -> Job:  # fmt: skip
        """Submit ``spec`` where it starts first and return its handle (``Job.site`` is where it went);
        :class:`ConfigError` if no site can run it, :class:`SubmissionError` if every one that could refused it
        or (racing) none ran it, with every site's reason (nothing left queued anywhere).

        ``policy``:

        * ``"first-fit"``: one submission, to the best site of :meth:`rank` (the next if that site refuses it);
          returns once it is queued. When no site can start it now, the one whose scheduler plans the soonest
          start goes first (one plan per site, kept a minute).
        * ``"race"``: attempts on the ``width`` best sites at once; the first to start is claimed and runs the
          payload, the others are released and cancelled before theirs could run (:mod:`offload.race`). An
          attempt whose scheduler says it will never start moves to the next site. Returns once one started.
        * ``"failover"``: the race with one attempt at a time: it moves to the next site when the site refuses
          it or says it will never start there, or when the attempt is overdue (below).
        * ``"estimate"``: failover over the sites in the order of their schedulers' plans, soonest first
          (:meth:`rank` with ``estimate=True``: SLURM's ``sbatch --test-only``, corrected by what this machine
          learnt of each site's plans).

        Racing, an attempt waiting for a reason that may clear (``Resources``, ``Priority``) is *overdue*
        ``patience`` seconds after its expected start (its scheduler's corrected plan; its submission where the
        scheduler makes none): the next site then gets an attempt too, and the overdue one keeps its place in
        its queue, so whichever starts first runs the job. ``patience=None``: never overdue.

        Racing, the client claims: it must run until this returns (``claim_wait``: seconds a started attempt
        waits for its claim before it gives up by itself, if the client died). A placement a killed client
        left is finished by :func:`resume_placement`. ``ranked``: verdicts from :meth:`rank` just now, e.g.
        shown to the user first; ``say``: told each step of a race, as a line for people."""
        _check(policy, patience)
        if policy == "first-fit":
            return await self._first_fit(spec, ranked)
        placement = await self.astart(spec, ranked=ranked, policy=policy, width=width, claim_wait=claim_wait,
                                      patience=patience, say=say)  # fmt: skip
        return await placement.arun()

    submit = _loop.blocking(asubmit)

    @_loop.on_loop
    async def astart(self, spec: SpecFor, *, ranked: Sequence[Verdict] | None = None, policy: str = "race",
                     width: int = 2, claim_wait: int = DEFAULT_WAIT, patience: float | None = DEFAULT_PATIENCE,
                     say: Say | None = None) -> Placement:  # fmt: skip
        """Start racing ``spec`` as :meth:`asubmit` does with ``policy`` (``"race"``, ``"failover"`` or
        ``"estimate"``), and return the :class:`~offload.Placement` once its first attempts are queued, before
        any starts: its :meth:`~offload.Placement.arun` claims one, here or, handed over with
        :meth:`~offload.Placement.to_json`, in another process (Airflow's triggerer claims a deferred task's).
        ``spec`` may be a function of the site (each site's job made for it); it runs on offload's I/O loop, so it
        may not call offload's sync API: ask what it needs of the sites (``await site.aworkdir()``) first."""
        _check(policy, patience)
        if policy == "first-fit":
            raise ConfigError("first-fit submits the job once, to one site, and claims nothing: use asubmit; a "
                              "placement races attempts: policy 'race', 'failover' or 'estimate'")  # fmt: skip
        verdicts = list(ranked) if ranked is not None else await self.arank(spec, estimate=True)
        # race and failover ask for plans too (for their attempts' due times), but keep first-fit's order
        feasible = self._feasible(self._ordered(verdicts, by_plan=policy == "estimate"))
        sites = {site.name: site for site in self.sites}
        placement = Placement.start(spec, [sites[v.site] for v in feasible], width=width if policy == "race" else 1,
                                    wait=claim_wait, patience=patience, records=self._records(), say=say)  # fmt: skip
        if say is not None:
            say(f"placement {placement.id}: {policy} over {', '.join(v.site for v in feasible)} "
                f"(if this client stops: offload placements resume {placement.id})")  # fmt: skip
        await placement.asubmit_attempts()
        return placement

    start = _loop.blocking(astart)

    def _feasible(self, verdicts: Sequence[Verdict]) -> list[Verdict]:
        """The sites that can run the job, best first; :class:`ConfigError` with every reason if none can."""
        feasible = [v for v in verdicts if v.feasible]
        if not feasible:
            reasons = [f"{v.site}: {v.reason}" for v in verdicts if not v.feasible]
            raise ConfigError(f"no site of {self.name} can run this job:\n  " + "\n  ".join(reasons))
        return feasible

    async def _first_fit(self, spec: SpecFor, ranked: Sequence[Verdict] | None) -> Job:
        verdicts = list(ranked) if ranked is not None else await self.arank(spec)
        feasible = self._feasible(await self._planned_if_none_free(verdicts, spec))
        reasons = [f"{v.site}: {v.reason}" for v in verdicts if not v.feasible]
        sites = {site.name: site for site in self.sites}
        for verdict in feasible:
            try:
                site = sites[verdict.site]
                job = await site.asubmit(spec(site) if callable(spec) else spec)
            except SubmissionError as exc:  # refused there (a limit, an account): the next site may take it
                log.warning("site %s refused the job (%s); trying the next site", verdict.site, exc.scheduler_message)
                reasons.append(f"{verdict.site}: refused: {exc.scheduler_message or exc}")
                continue
            log.info("placed job %s on %s: %s", job.id, verdict.site, verdict.describe())
            if verdict.expected is not None and verdict.expected.said is not None:  # placed by its plan
                site.learn_when_started(job, verdict.expected.said)
            return job
        raise SubmissionError(f"every site of {self.name} refused this job:\n  " + "\n  ".join(reasons))

    submit = _loop.blocking(asubmit)

    def _records(self) -> JobRecords:
        if self._placements is None:
            self._placements = JobRecords()
        return self._placements


def _check(policy: str, patience: float | None) -> None:
    """Refuse a bad policy or patience before anything is ranked or submitted."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown placement policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if patience is not None and (not isinstance(patience, int | float) or patience < 0):
        raise ConfigError(f"patience is seconds an attempt may wait past its expected start (0 or more, or "
                          f"None: forever); got {patience!r}")  # fmt: skip


@_loop.on_loop
async def aresume_placement(placement_id: str, *, say: Say | None = None) -> Job:
    """Finish a placement whose client stopped before it ended (killed, or its machine restarted), from this
    machine's records and one look at each site: return the attempt that runs the job. Never runs the payload
    twice (:mod:`offload.race`)."""
    return await resume(placement_id, say=say)


resume_placement = _loop.blocking(aresume_placement)


@_loop.on_loop
async def achoose_site(site: str | Sequence[str] | Site | None, spec: JobSpec) -> Site:
    """The site to build ``spec``'s work on, for code that takes a site from its user (a Dask cluster, an
    executor, an Airflow task, a hub profile): a :class:`Site` as it is; one name (or None: the default site) as
    :func:`offload.load_site` gives it, ``spec`` checked against it; several (``"a,b"``, ``"@group"``, a list)
    the one where ``spec`` starts first (:meth:`SiteGroup.choose`), :class:`ConfigError` with every site's
    reason if none can run it."""
    if isinstance(site, Site):
        return site
    if site is None or (isinstance(site, str) and not names_several(site)):
        chosen = load_site(site)
        chosen.validate(spec)
        return chosen
    return await load_sites(site).achoose(spec)


choose_site = _loop.blocking(achoose_site)


def names_several(site: str | None) -> bool:
    """Whether a ``--site`` value names several sites (``a,b`` or ``@group``) rather than one."""
    return bool(site) and ("," in site or site.startswith("@"))


def load_sites(sites: str | Sequence[str]) -> SiteGroup:
    """The sites ``sites`` names (``"a,b"``, ``"@group"`` of the profile file's ``[groups]``, or a list of
    those) as one :class:`SiteGroup`, each the shared :class:`Site` that :func:`offload.load_site` gives."""
    return SiteGroup([load_site(name) for name in load_profiles().names(sites)])


async def _judge(site: Site, spec: JobSpec, estimate: bool) -> Verdict:
    try:
        site.validate(spec)
    except ConfigError as exc:
        return Verdict(site.name, False, False, str(exc))
    try:
        if not estimate:
            return _verdict(site, spec, await site.anodes())
        nodes, expected = await asyncio.gather(site.anodes(), site.aexpected_start(spec))
    except OffloadError as exc:  # not an error of the placement: that site is out of it for now
        return Verdict(site.name, False, False, f"unavailable: {exc}")
    verdict = _verdict(site, spec, nodes)
    if verdict.feasible and expected.refused:
        return Verdict(site.name, False, False, f"{site.config.scheduler} would refuse it: {expected.refused}")
    return dataclasses.replace(verdict, expected=expected)


def _verdict(site: Site, spec: JobSpec, nodes: list[NodeResources]) -> Verdict:
    """First-fit on one site's nodes: can any set of its nodes run the job, and are enough of them free now."""
    res = spec.resources
    config = site.config
    if res.partition:
        pool = [n for n in nodes if res.partition in n.partitions]
        if not pool:
            parts = sorted({p for n in nodes for p in n.partitions})
            return Verdict(site.name, False, False, f"no partition {res.partition!r} (it has {', '.join(parts)})")
    else:  # the partition the site's profile picks for this job, where its nodes say which they are in
        default = config.gpu_partition if res.total_gpus and config.gpu_partition else config.partition
        pool = [n for n in nodes if default in n.partitions] or nodes
    gpus_each = math.ceil(res.total_gpus / res.nodes) if res.total_gpus else 0
    cpus_each = (res.cpus or 1) * (res.tasks_per_node or 1)
    capable = [n for n in pool if n.gpus >= gpus_each and n.cpus >= cpus_each]
    if len(capable) < res.nodes:
        largest = max((n.gpus for n in pool), default=0)
        what = f"{gpus_each} GPUs" if gpus_each else f"{cpus_each} CPUs"
        return Verdict(site.name, False, False,
                       f"needs {res.nodes} node(s) with {what} each; {len(capable)} of its {len(pool)} node(s) have "
                       f"that (the largest has {largest} GPUs)")  # fmt: skip
    free = [n for n in capable if n.available and n.gpus_free >= gpus_each and n.cpus_free >= cpus_each]
    available = [n for n in capable if n.available]
    if len(available) < res.nodes:
        return Verdict(site.name, False, False, f"only {len(available)} of the nodes that could run it take jobs now")
    return Verdict(
        site.name,
        True,
        len(free) >= res.nodes,
        f"{len(free)} of {len(capable)} capable node(s) free",
        gpus_free=sum(n.gpus_free for n in capable),
        gpus=sum(n.gpus for n in capable),
        cpus_free=sum(n.cpus_free for n in capable),
    )
