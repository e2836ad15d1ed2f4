"""A job raced over several sites runs its payload exactly once (offload.claims, offload.race).

The gate is the batch script's own shell, run here by bash as a node would run it; the races run on two real
local sites (local processes, the same job layout and batch script as on a SLURM site), so both attempts start
at once and the claim alone decides which one runs. The same on the test site's SLURM cluster and Grid Engine
cell: tests/integration/test_placement.py."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import time
from pathlib import Path

import pytest

import offload
from offload import ConfigError, JobSpec, JobState, SiteGroup, SubmissionError, _loop
from offload.claims import CLAIM, RELEASE, RELEASED_EXIT, Gate, decide, gate_lines
from offload.config import local_site_config
from offload.jobfiles import DECISION
from offload.race import Placement, resume
from offload.records import JobRecords


def gate(tmp_path: Path, wait: int, decision: str | None = None) -> subprocess.CompletedProcess:
    """The gate's lines with a payload after them, run by bash in ``tmp_path`` as the batch script would."""
    if decision:
        (tmp_path / DECISION).symlink_to(decision)
    script = "\n".join([f"export OFFLOAD_JOB_DIR={tmp_path}", *gate_lines(wait), "echo payload ran"])
    (tmp_path / "secrets.env").write_text("export S=1\n")
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)


def test_a_claimed_attempt_runs_its_payload(tmp_path):
    result = gate(tmp_path, 5, CLAIM)
    assert (result.returncode, result.stdout) == (0, "payload ran\n")


def test_a_released_attempt_ends_without_its_payload_and_removes_its_secrets(tmp_path):
    result = gate(tmp_path, 5, RELEASE)
    assert result.returncode == RELEASED_EXIT and result.stdout == ""
    assert "released" in result.stderr and not (tmp_path / "secrets.env").exists()


def test_an_attempt_nobody_claims_releases_itself_and_a_late_claim_reads_that(tmp_path):
    started = time.monotonic()
    result = gate(tmp_path, 1)
    assert result.returncode == RELEASED_EXIT and result.stdout == "" and time.monotonic() - started < 10
    assert (tmp_path / DECISION).readlink() == Path(RELEASE)
    site = offload.Site(local_site_config().with_overrides(workdir=str(tmp_path / "work")))
    try:
        assert _loop.run(decide(site.transport, str(tmp_path), CLAIM)) == RELEASE  # too late: it never ran
    finally:
        site.close()


def test_the_first_decision_holds_whoever_makes_it(tmp_path):
    site = offload.Site(local_site_config().with_overrides(workdir=str(tmp_path / "work")))
    try:
        assert _loop.run(decide(site.transport, str(tmp_path), CLAIM)) == CLAIM
        assert _loop.run(decide(site.transport, str(tmp_path), CLAIM)) == CLAIM  # a restarted client: the same
        assert _loop.run(decide(site.transport, str(tmp_path), RELEASE)) == CLAIM
        assert _loop.run(decide(site.transport, str(tmp_path / "gone"), CLAIM)) == ""
    finally:
        site.close()
    with pytest.raises(ConfigError, match="whole number of seconds"):
        Gate("/x", wait=0)


@pytest.fixture
def two_sites(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("".join(
        f'[sites.{name}]\ntransport = "local"\nscheduler = "local"\nruntime = "none"\nworkdir = "{tmp_path / name}"\n'
        "poll_interval = 0.5\n" for name in ("east", "west")))  # fmt: skip
    sites = [offload.load_site(name) for name in ("east", "west")]
    yield sites
    for site in sites:
        site.close()


def payload(tmp_path: Path) -> JobSpec:
    """A payload that appends one line per run to a file both sites see: the count of its runs."""
    return JobSpec(["sh", "-c", f'echo "ran on $OFFLOAD_JOB_DIR" >> {tmp_path}/runs; echo done'], name="raced")


def runs(tmp_path: Path) -> list[str]:
    path = tmp_path / "runs"
    return path.read_text().splitlines() if path.exists() else []


def test_a_race_runs_the_payload_once_and_releases_the_other_attempt(two_sites, tmp_path):
    said: list[str] = []
    job = SiteGroup(two_sites).submit(payload(tmp_path), policy="race", width=2, say=said.append)
    assert job.wait(timeout=30).state is JobState.COMPLETED
    records = JobRecords()
    placement = records.placements()[0]
    assert placement.state == "placed" and sorted(a.state for a in placement.attempts) == ["claimed", "released"]
    loser = next(a for a in placement.attempts if a.state == "released")
    assert Path(loser.jobdir, DECISION).readlink() == Path(RELEASE)
    time.sleep(1.5)  # the released attempt ends by itself too, its payload never started
    assert runs(tmp_path) == [f"ran on {job.ref.jobdir}"]
    assert any("claimed" in line for line in said) and any("released" in line for line in said), said
    assert any(f"offload placements resume {placement.id}" in line for line in said), said


def test_failover_tries_one_site_at_a_time(two_sites, tmp_path):
    job = SiteGroup(two_sites).submit(payload(tmp_path), policy="failover")
    assert job.wait(timeout=30).state is JobState.COMPLETED
    placement = JobRecords().placements()[0]
    assert [(a.site, a.state) for a in placement.attempts] == [("east", "claimed")]
    assert runs(tmp_path) == [f"ran on {job.ref.jobdir}"]


def test_a_client_killed_while_claiming_is_finished_by_resume_without_a_second_run(two_sites, tmp_path):
    """The record names the attempt being claimed before the claim is made: a client stopped right there (the
    worst point: both attempts started, no decision written) leaves a placement resume finishes with that one."""
    records = JobRecords()

    async def until_claiming() -> str:
        race = Placement.start(payload(tmp_path), two_sites, width=2, wait=60, records=records)
        await race._fill()
        live = race._live()
        assert len(live) == 2
        for attempt in live:
            await race._job(attempt).await_state(JobState.RUNNING)
        race._save(claiming=f"{live[1].site}/{live[1].job_id}")  # ... and the client dies here
        return race.id

    placement_id = _loop.run(until_claiming())
    assert runs(tmp_path) == []  # both attempts wait for their claim
    job = _loop.run(resume(placement_id, records=records))
    assert job.site.name == "west" and job.wait(timeout=30).state is JobState.COMPLETED
    assert runs(tmp_path) == [f"ran on {job.ref.jobdir}"]
    assert {a.site: a.state for a in records.placement(placement_id).attempts} == {"east": "released",
                                                                                  "west": "claimed"}  # fmt: skip
    assert _loop.run(resume(placement_id, records=records)) == job  # a placed placement: its winner, again


def test_resume_finds_an_attempt_whose_id_the_client_never_learnt(two_sites, tmp_path):
    records = JobRecords()

    async def submitted_unrecorded() -> str:
        race = Placement.start(payload(tmp_path), two_sites[:1], width=1, wait=60, records=records)
        await race._fill()
        attempt = race.record.attempts[0]
        race._attempt(attempt.site, state="planned", job_id=None)  # the client died before it wrote the id
        return race.id

    placement_id = _loop.run(submitted_unrecorded())
    job = _loop.run(resume(placement_id, records=records))
    assert job.wait(timeout=30).state is JobState.COMPLETED and len(runs(tmp_path)) == 1


def test_a_site_that_refuses_is_passed_over_and_its_refusal_kept(two_sites, tmp_path, monkeypatch):
    east, west = two_sites

    async def refuse(spec, *, gate=None):
        raise SubmissionError("refused", scheduler_message="QOSMaxSubmitJobPerUserLimit")

    monkeypatch.setattr(east, "asubmit", refuse)
    job = SiteGroup(two_sites).submit(payload(tmp_path), policy="failover")
    assert job.site is west and job.wait(timeout=30).state is JobState.COMPLETED
    attempts = {a.site: a for a in JobRecords().placements()[0].attempts}
    assert attempts["east"].state == "refused" and "QOSMaxSubmitJobPerUserLimit" in attempts["east"].reason


def test_every_site_refusing_fails_the_placement_with_each_reason(two_sites, tmp_path, monkeypatch):
    async def refuse(spec, *, gate=None):
        raise SubmissionError("refused", scheduler_message="InvalidAccount")

    for site in two_sites:
        monkeypatch.setattr(site, "asubmit", refuse)
    with pytest.raises(SubmissionError, match="no site ran the job") as err:
        SiteGroup(two_sites).submit(payload(tmp_path), policy="race")
    assert str(err.value).count("InvalidAccount") == 2
    assert JobRecords().placements()[0].state == "failed"


def test_bad_policy_and_width_are_refused_before_anything_is_submitted(two_sites, tmp_path):
    with pytest.raises(ConfigError, match="unknown placement policy 'fastest'"):
        SiteGroup(two_sites).submit(payload(tmp_path), policy="fastest")
    with pytest.raises(ConfigError, match="width"):
        SiteGroup(two_sites).submit(payload(tmp_path), policy="race", width=0)
    assert runs(tmp_path) == [] and not list(tmp_path.glob("*/jobs/*"))


def test_resume_of_an_unknown_placement_says_where_to_look(tmp_path):
    with pytest.raises(ConfigError, match="offload placements"):
        asyncio.run(resume("p-none", records=JobRecords(tmp_path / "jobs.sqlite")))


def test_resume_submits_the_next_attempt_from_the_recorded_spec(two_sites, tmp_path):
    """The client died after its only attempt was lost (here: cancelled before it started), with a site left to
    try: resume submits there from the spec the record holds."""
    records = JobRecords()

    async def first_attempt_lost() -> str:
        race = Placement.start(payload(tmp_path), two_sites, width=1, wait=60, records=records)
        await race._fill()
        [attempt] = race._live()
        await race._release(attempt, "lost")  # released and cancelled: it never runs
        race._attempt(attempt.site, state="queued")  # ... but the client died before it noted that
        return race.id

    placement_id = _loop.run(first_attempt_lost())
    job = _loop.run(resume(placement_id, records=records))
    assert job.site.name == "west" and job.wait(timeout=30).state is JobState.COMPLETED
    assert runs(tmp_path) == [f"ran on {job.ref.jobdir}"]


def test_a_spec_with_secrets_is_never_recorded_so_resume_says_to_submit_again(two_sites, tmp_path):
    records = JobRecords()
    spec = JobSpec(["true"], secrets={"TOKEN": "s3cr3t"}, name="secretive")

    async def first_attempt_lost() -> str:
        race = Placement.start(spec, two_sites, width=1, wait=60, records=records)
        await race._fill()
        [attempt] = race._live()
        await race._release(attempt, "lost")
        race._attempt(attempt.site, state="queued")
        return race.id

    placement_id = _loop.run(first_attempt_lost())
    written = b"".join(path.read_bytes() for path in (tmp_path / "state").iterdir())  # the database and its WAL
    assert b"secretive" in written and b"s3cr3t" not in written
    with pytest.raises(SubmissionError, match="has secrets or a spec made per site, which offload never writes down"):
        _loop.run(resume(placement_id, records=records))


def started_attempts(tmp_path: Path, sites, spec: JobSpec | None = None) -> Placement:
    """A placement whose attempts were submitted on both sites, both started and waiting at their gate."""

    async def submit() -> Placement:
        placement = Placement.start(spec or payload(tmp_path), sites, width=2, wait=60, records=JobRecords())
        await placement.asubmit_attempts()
        for attempt in placement._live():
            await placement._job(attempt).await_state(JobState.RUNNING)
        return placement

    return _loop.run(submit())


def test_a_placement_handed_to_another_process_is_claimed_there_once_and_without_its_secrets(two_sites, tmp_path):
    """As the Airflow operator does: the attempts are submitted in one process, claimed in another (its
    triggerer), which gets only the attempts, never the spec and its secrets."""
    spec = dataclasses.replace(payload(tmp_path), secrets={"TOKEN": "s3cr3t"})
    handed = started_attempts(tmp_path, two_sites, spec).to_json()
    assert "s3cr3t" not in handed and "TOKEN" not in handed
    said: list[str] = []
    job = Placement.from_json(handed, say=said.append).run()
    assert job.wait(timeout=30).state is JobState.COMPLETED
    time.sleep(1.5)
    assert runs(tmp_path) == [f"ran on {job.ref.jobdir}"]
    assert any("claimed" in line for line in said) and any("released" in line for line in said), said
    with pytest.raises(ConfigError, match="not a placement handed over by offload"):
        Placement.from_json('{"id": "p1"}')


def test_two_watchers_of_one_placement_never_claim_two_attempts(two_sites, tmp_path):
    """A trigger Airflow runs twice (two triggerers for a moment) claims in two processes at once. The second
    watcher looks at the attempts in the other order, the worst case: each would claim a different one. Each
    releases the other attempts before it claims, so at most one attempt holds a claim, whoever comes first."""
    handed = json.loads(started_attempts(tmp_path, two_sites).to_json())
    reversed_ = json.dumps({**handed, "attempts": handed["attempts"][::-1]})

    async def both() -> list:
        first, second = Placement.from_json(json.dumps(handed)), Placement.from_json(reversed_)
        return await asyncio.gather(first.arun(), second.arun(), return_exceptions=True)

    outcomes = _loop.run(both())
    decisions = [(Path(a["jobdir"]) / DECISION).readlink() for a in handed["attempts"]]
    assert decisions.count(Path(CLAIM)) <= 1, decisions
    time.sleep(1.5)
    assert len(runs(tmp_path)) == decisions.count(Path(CLAIM))
    winners = {(job.site.name, job.id) for job in outcomes if isinstance(job, offload.Job)}
    assert len(winners) <= 1, outcomes  # both watchers that returned name the same attempt
    assert all(isinstance(o, offload.Job | SubmissionError) for o in outcomes), outcomes


def test_a_watcher_after_the_claim_finds_the_winner_even_once_it_ended(two_sites, tmp_path):
    """A second watcher (the trigger run again after the first claimed) goes on with the claimed attempt; once
    that attempt has ended, it still knows it ran (its decision says claim) rather than calling it lost."""
    handed = started_attempts(tmp_path, two_sites).to_json()
    job = Placement.from_json(handed).run()
    again = Placement.from_json(json.dumps({**json.loads(handed), "attempts": json.loads(handed)["attempts"][::-1]}))
    assert again.run() == job
    assert job.wait(timeout=30).state is JobState.COMPLETED
    assert Placement.from_json(handed).run() == job  # after the end too
    assert len(runs(tmp_path)) == 1


def test_attempts_found_on_the_sites_are_adopted_and_claimed_once(two_sites, tmp_path):
    """A process that submitted attempts died before it handed them over (an Airflow worker): a retry finds them
    by their name on each site and adopts them."""
    started_attempts(tmp_path, two_sites)
    found = [job for site in two_sites for job in site.find("raced")]
    assert {job.site.name for job in found} == {"east", "west"}
    job = Placement.adopt(found, name="raced").run()
    assert job.wait(timeout=30).state is JobState.COMPLETED
    time.sleep(1.5)
    assert runs(tmp_path) == [f"ran on {job.ref.jobdir}"]
