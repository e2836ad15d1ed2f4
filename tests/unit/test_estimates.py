"""When a job would start on a site (offload.estimates): SLURM's ``sbatch --test-only`` answer read, plans kept a
minute per job shape, corrected by the site's learnt starts, and a raced attempt's due time and lesson.

The plan lines are sbatch's own, as sbatch 22.05 prints them on the test site (``sbatch --test-only``: "Job N to
start at <time> using N processors on nodes <nodes> in partition <partition>", or "error: ..."); the ``now=`` and
``start=`` lines are the login node's ``date`` in offload's command. The real command runs on the test site's
SLURM clusters in tests/integration/test_race.py."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

import offload
from offload import JobSpec, JobState, Resources, SiteGroup
from offload.config import local_site_config
from offload.estimates import MIN_LEARNT, corrected
from offload.records import JobRecords
from offload.schedulers.base import StartEstimate
from offload.schedulers.slurm import _start_estimate


def test_sbatch_plan_is_read_as_seconds_from_the_login_nodes_now():
    output = ("sbatch: Job 526 to start at 2026-12-06T21:19:51 using 2 processors on nodes node[1-2] in partition "
              "gpu\nnow=1796591981\nstart=1796592041\n")  # fmt: skip
    assert _start_estimate(output) == StartEstimate(60.0, where="on nodes node[1-2] in partition gpu")
    past = "sbatch: Job 9 to start at 2026-12-06T21:19:39 using 1 processors on nodes n1 in partition gpu\n"
    assert _start_estimate(past + "now=200\nstart=190\n").seconds == 0.0  # planned for "now", a moment ago
    # behind a job with no time limit, sbatch plans a year out (seen on the test site): it cannot tell
    assert _start_estimate(past + "now=0\nstart=31535994\n") == StartEstimate(None)


def test_sbatch_refusal_and_silence():
    refused = "sbatch: error: Batch job submission failed: Requested node configuration is not available\nnow=5\n"
    assert _start_estimate(refused) == StartEstimate(None, refused="Batch job submission failed: Requested node "
                                                     "configuration is not available")  # fmt: skip
    assert _start_estimate("a site banner\nnow=5\n") is None


def test_plans_are_corrected_by_the_sites_learnt_starts(tmp_path):
    records = JobRecords(tmp_path / "jobs.sqlite")
    assert corrected(records, "east", 600) == (600, "")
    for _ in range(MIN_LEARNT):  # its plans ran long: 10 min planned, 1 min waited
        records.learn_start("east", 600, 60)
    records.learn_start("west", 10, 10)
    seconds, note = corrected(records, "east", 600)
    assert seconds == pytest.approx(60) and f"last {MIN_LEARNT} starts" in note
    assert corrected(records, "west", 600) == (600, "")  # one site's lessons are its own
    assert corrected(records, "east", 0)[0] == 0  # "now" stays now


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    site = offload.Site(local_site_config().with_overrides(workdir=str(tmp_path / "work"), poll_interval=0.3))
    asked: list[Resources] = []

    async def plan(transport, spec):  # the scheduler's seam: a plan of 100 s for every job
        asked.append(spec.resources)
        await asyncio.sleep(0.05)  # a round trip, during which other jobs ask
        return StartEstimate(100.0, where="on nodes n1")

    monkeypatch.setattr(site.scheduler, "estimate_start", plan)
    site.asked = asked
    yield site
    site.close()


def test_a_plan_is_asked_once_a_minute_per_job_shape(site, monkeypatch):
    one, other = JobSpec(["true"], name="a"), JobSpec(["true"], name="b", resources=Resources(cpus=2))
    first = site.expected_start(one)
    assert first.said == first.seconds == 100.0 and "plans it in 100 s on nodes n1" in first.note
    site.expected_start(JobSpec(["false"], name="c"))  # another job of the same shape: the kept answer
    site.expected_start(other)
    assert len(site.asked) == 2
    import offload.estimates as estimates

    monkeypatch.setattr(estimates, "ASK_EVERY", 0)  # a minute later
    site.expected_start(one)
    assert len(site.asked) == 3


def test_jobs_ranked_at_once_share_one_plan(site):
    async def many():
        return await asyncio.gather(*(site.aexpected_start(JobSpec(["true"], name=f"j{i}")) for i in range(16)))

    answers = offload._loop.run(many())
    assert len(site.asked) == 1 and {a.said for a in answers} == {100.0}


def test_a_raced_attempt_is_due_after_its_plan_and_its_start_teaches_the_site(site, tmp_path):
    job = SiteGroup([site]).submit(JobSpec(["true"], name="taught"), policy="estimate", patience=7)
    assert job.wait(timeout=30).state is JobState.COMPLETED
    [attempt] = JobRecords().placements()[0].attempts
    assert attempt.state == "claimed" and attempt.planned == 100.0
    assert attempt.due == pytest.approx(attempt.submitted_at + 107, abs=2)
    [(planned, waited)] = JobRecords().starts_learnt(site.name, 5)
    assert planned == 100.0 and 0 <= waited < 10


def test_bad_patience_is_refused_before_anything_is_submitted(site):
    with pytest.raises(offload.ConfigError, match="patience"):
        SiteGroup([site]).submit(JobSpec(["true"]), policy="estimate", patience=-1)
    assert JobRecords().placements() == []


def test_a_job_first_fit_placed_by_its_plan_teaches_the_site_when_seen_starting(site, monkeypatch):
    """No site can start it now (every CPU of the one node busy), so first-fit asks for the plan and places the
    job by it; the site's poller then sees it RUNNING and the wait is learnt, as a raced attempt's is. A job that
    ends before it is seen running teaches nothing."""
    from offload.schedulers.base import NodeResources

    async def busy(transport):
        return [NodeResources("n1", ("local",), "alloc", 0, 0, 4, 4, 1000, 1000)]

    other = offload.Site(dataclasses.replace(site.config, name="other", workdir=f"{site.config.workdir}-other"))

    async def later(transport, spec):
        return StartEstimate(900.0)

    for one in (site, other):
        monkeypatch.setattr(one.scheduler, "nodes", busy)
    monkeypatch.setattr(other.scheduler, "estimate_start", later)
    try:
        job = SiteGroup([other, site]).submit(JobSpec(["sleep", "2"], name="placed-by-plan"))
    finally:
        other.close()
    assert job.site is site and job.wait(timeout=30).state is JobState.COMPLETED
    [(planned, waited)] = JobRecords().starts_learnt(site.name, 5)
    assert planned == 100.0 and 0 <= waited < 10
    quick = site.submit(JobSpec(["true"], name="unseen"))
    site.learn_when_started(quick, 50.0)
    assert quick.wait(timeout=30).state is JobState.COMPLETED
    assert len(JobRecords().starts_learnt(site.name, 5)) in (1, 2)  # seen running or not, at most one more
    assert quick.id not in site._planned  # forgotten at its end either way
