"""One job raced over the test site's two real schedulers (SLURM and Grid Engine), through the CLI as a user runs
it: the payload runs exactly once, where it started first; the other attempt is released and cancelled before
its payload could run; a site that says the job will never start there is left for the next; a client killed at
any point leaves a placement that ``offload placements resume`` finishes, still with one run. Nothing is
stubbed: the claim is the attempt's own batch script waiting on its node, the states are squeue's and qstat's.

The payload prints a marker; the runs are counted in the outputs of every attempt's directory (this test runs
as root on the site's machine, so it reads them directly)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from offload.records import JobRecords
from tests import leftovers

from .conftest import CONFIG, queued_jobs, wait_until

OFFLOAD = [sys.executable, "-m", "offload.cli"]
GE_ENV = {"SGE_ROOT": "/var/lib/gridengine", "SGE_CELL": "default"}


@pytest.fixture
def env(testsite_config, tmp_path):
    """The test site's profile (both sites, the group @both), and a state directory of this test's own, so the
    placements listed are this test's."""
    return {**os.environ, "OFFLOAD_CONFIG": str(CONFIG), "OFFLOAD_STATE_DIR": str(tmp_path / "state")}


def offload(env, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*OFFLOAD, *args], capture_output=True, text=True, timeout=timeout, env=env)


def placements(env) -> list[dict]:
    result = offload(env, "placements", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def runs(placement: dict, marker: str) -> int:
    """How many attempts of ``placement`` ran the payload (printed ``marker``), from their output files."""
    count = 0
    for attempt in placement["attempts"]:
        output = Path(attempt["jobdir"], "output")
        if output.exists() and marker in output.read_text(errors="replace"):
            count += 1
    return count


def ge_jobs(user: str) -> list[str]:
    """The user's Grid Engine jobs, read with Grid Engine's own qstat (not offload's)."""
    out = subprocess.run(["qstat", "-u", user], capture_output=True, text=True, env={**os.environ, **GE_ENV}).stdout
    return [line.split()[0] for line in out.splitlines()[2:] if line.split()]


def no_job_left(user: str) -> None:
    wait_until(lambda: queued_jobs(user) == [] and ge_jobs(user) == [], timeout=90,
               what="no job of the user left on either scheduler")  # fmt: skip


def payload(marker: str) -> list[str]:
    return ["--", "sh", "-c", f"echo {marker}; echo GPUS=$CUDA_VISIBLE_DEVICES"]


def test_a_race_over_two_free_sites_runs_the_payload_once(env, site_user):
    """Both sites have free GPUs: both attempts start within a poll round or two, and the claim alone decides."""
    marker = f"PAYLOAD-{uuid.uuid4().hex[:8]}"
    result = offload(env, "run", "--site", "@both", "--policy", "race", "--gpus", "1", *payload(marker))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(marker) == 1 and "GPUS=" in result.stdout, result.stdout
    assert "claimed, its payload runs" in result.stderr, result.stderr
    [placement] = placements(env)
    states = sorted(a["state"] for a in placement["attempts"])
    assert placement["state"] == "placed" and states == ["claimed", "released"], placement
    no_job_left(site_user)
    assert runs(placement, marker) == 1, placement
    loser = next(a for a in placement["attempts"] if a["state"] == "released")
    assert os.readlink(Path(loser["jobdir"], "decision")) == "release"


def test_failover_leaves_a_site_that_says_the_job_will_never_start(env, site_user):
    """Both sites busy (scripted load: every GPU of each taken by another job). The attempt goes to the first
    site of the list, SLURM; then an admin makes it wait on a dependency that can never be met
    (DependencyNeverSatisfied, a reason SLURM never clears): the placement moves to Grid Engine at its next
    poll, keeps SLURM's reason, and the job runs there once the GE load ends."""
    marker = f"PAYLOAD-{uuid.uuid4().hex[:8]}"
    hog = f"hog-{uuid.uuid4().hex[:6]}"
    client = None
    try:
        for site in ("testsite", "gridengine"):  # running before the job is placed, so neither can start it now
            hold_gpus(env, site, hog, "00:10:00", 300)
        client = subprocess.Popen([*OFFLOAD, "run", "--site", "testsite,gridengine", "--policy", "failover",
                                   "--gpus", "1", *payload(marker)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        attempt = wait_until(lambda: next((a for p in placements(env) for a in p["attempts"]
                                           if a["site"] == "testsite" and a["job_id"]), None),
                             timeout=120, what="the SLURM attempt")  # fmt: skip
        # a job that failed just now (on the CPU node; SLURM forgets ended jobs after MinJobAge, 30 s here)
        failed = offload(env, "run", "--site", "testsite", "--", "false")
        assert failed.returncode == 1, failed.stderr
        failed_id = failed.stderr.split("submitted job ")[1].split()[0]
        subprocess.run(["scontrol", "update", f"jobid={attempt['job_id']}", f"dependency=afterok:{failed_id}"],
                       check=True, capture_output=True)  # fmt: skip
        wait_until(lambda: any(a["site"] == "gridengine" and a["job_id"] for p in placements(env)
                               for a in p["attempts"]), timeout=120,
                   what="the attempt to move to Grid Engine")  # fmt: skip
        offload(env, "cancel", "--site", "gridengine", "--name", hog)  # the GE load ends: the job starts there
        out, err = client.communicate(timeout=240)
    finally:
        if client is not None and client.poll() is None:
            client.send_signal(signal.SIGINT)
            client.communicate(timeout=120)
        for site in ("testsite", "gridengine"):
            offload(env, "cancel", "--site", site, "--name", hog)
    assert client.returncode == 0, err
    assert out.count(marker) == 1, out
    assert "will never start (DependencyNeverSatisfied" in err or "DependencyNeverSatisfied" in err, err
    [placement] = placements(env)
    attempts = {a["site"]: a for a in placement["attempts"]}
    assert attempts["gridengine"]["state"] == "claimed", placement
    assert attempts["testsite"]["state"] == "released" and "DependencyNeverSatisfied" in attempts["testsite"]["reason"]
    no_job_left(site_user)
    assert runs(placement, marker) == 1, placement


KILLS = int(os.environ.get("OFFLOAD_RACE_KILLS", "3"))  # bench/race_kill.py runs 100


@pytest.mark.parametrize("run", range(KILLS))
def test_a_client_killed_during_a_race_never_causes_a_second_run(env, site_user, run):
    """SIGKILL at a random point of the race (before the record, while submitting, while both attempts wait for
    their claim, while claiming, after): then ``offload placements resume`` finishes the placement. The payload
    ran at most once in all, exactly once when the placement was recorded, and no job is left."""
    marker = f"PAYLOAD-{uuid.uuid4().hex[:8]}"
    client = subprocess.Popen([*OFFLOAD, "run", "--site", "@both", "--policy", "race", "--gpus", "1",
                               *payload(marker)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(random.Random(run).uniform(0.5, 12.0))
    client.kill()
    client.wait(timeout=30)
    found = placements(env)
    if found and found[0]["state"] != "failed":
        resumed = offload(env, "placements", "resume", found[0]["id"], timeout=300)
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.count(marker) <= 1, resumed.stdout
        placement = placements(env)[0]
        no_job_left(site_user)
        assert runs(placement, marker) == 1, placement
    else:  # killed before the placement was recorded, or before any attempt was: nothing may run
        no_job_left(site_user)
        assert all(runs(p, marker) == 0 for p in found), found


def hold_gpus(env, site: str, name: str, walltime: str, seconds: int) -> str:
    """Scripted load: another job takes every GPU of ``site`` for ``seconds``, asking for ``walltime`` (what its
    scheduler plans the next jobs by). Its id, once it runs."""
    held = offload(env, "run", "--site", site, "--detach", "--nodes", "2", "--gpus-per-node", "2", "--time", walltime,
                   "--name", name, "--", "sleep", str(seconds))  # fmt: skip
    assert held.returncode == 0, held.stderr
    job_id = held.stdout.strip()
    wait_until(lambda: "RUNNING" in offload(env, "status", "--site", site, job_id).stdout, timeout=90,
               what=f"the load on {site} to run")  # fmt: skip
    return job_id


def test_estimate_places_the_job_where_its_scheduler_plans_the_sooner_start(env, site_user):
    """Both SLURM clusters busy: the test site's GPUs held by a job asking for 30 minutes, the second cluster's
    by one asking for 1 (it ends after 15 s). Free resources cannot tell two sites that both wait apart (``sites
    rank`` keeps the user's order, the test site first); ``sbatch --test-only`` on each says the second cluster
    starts it in about a minute and the test site in about 30, so first-fit then sends it there, and so does
    ``--policy estimate``. Its start is then learnt, in this machine's records, against what the second cluster
    planned."""
    marker = f"PAYLOAD-{uuid.uuid4().hex[:8]}"
    hog = f"hog-{uuid.uuid4().hex[:6]}"
    try:
        hold_gpus(env, "testsite", hog, "00:30:00", 300)
        hold_gpus(env, "second", hog, "00:01:00", 15)
        first_fit = json.loads(
            offload(env, "sites", "rank", "--site", "testsite,second", "--gpus", "1", "--json").stdout
        )
        assert [v["site"] for v in first_fit] == ["testsite", "second"], first_fit
        assert not any(v["starts_now"] for v in first_fit), first_fit
        ranked = offload(env, "sites", "rank", "--site", "testsite,second", "--gpus", "1", "--estimate", "--json")
        plans = {v["site"]: v["expected"] for v in json.loads(ranked.stdout)}
        assert [v["site"] for v in json.loads(ranked.stdout)] == ["second", "testsite"], ranked.stdout
        assert plans["second"]["said"] <= 75 and plans["testsite"]["said"] >= 25 * 60, plans
        # first-fit too, when no site can start it now, goes where the plan is soonest (so do the adapters)
        detached = offload(env, "run", "--site", "testsite,second", "--detach", "--gpus", "1", "--", "true")
        assert detached.returncode == 0 and "to site 'second'" in detached.stderr, detached.stderr
        offload(env, "cancel", "--site", "second", detached.stdout.strip())
        result = offload(env, "run", "--site", "testsite,second", "--policy", "estimate", "--gpus", "1",
                         "--time", "00:05:00", *payload(marker))  # fmt: skip
    finally:
        for site in ("testsite", "second"):
            offload(env, "cancel", "--site", site, "--name", hog)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(marker) == 1, result.stdout
    assert "slurm plans it in" in result.stderr, result.stderr
    [placement] = placements(env)
    assert [(a["site"], a["state"]) for a in placement["attempts"]] == [("second", "claimed")], placement
    attempt = placement["attempts"][0]
    # planned again by the run's own process, a moment after `sites rank` did
    assert abs(attempt["planned"] - plans["second"]["said"]) <= 10 and attempt["due"] > attempt["submitted_at"], attempt
    learnt = JobRecords(Path(env["OFFLOAD_STATE_DIR"]) / "jobs.sqlite").starts_learnt("second", 5)
    assert len(learnt) == 1 and 5 <= learnt[0][1] <= 120, learnt  # it waited for the load's end, ~15 s
    no_job_left(site_user)


def test_an_overdue_attempt_keeps_its_place_while_the_next_site_gets_one(env, site_user):
    """Both sites busy, so failover keeps the user's order: Grid Engine first. Grid Engine plans nothing ahead,
    so its attempt is due after the patience alone (3 s); past it, the attempt is overdue and SLURM gets one too,
    while the Grid Engine attempt keeps its place in its queue. SLURM's load ends first: its attempt starts and is
    claimed, and the Grid Engine attempt is released and cancelled. The payload runs once."""
    marker = f"PAYLOAD-{uuid.uuid4().hex[:8]}"
    hog = f"hog-{uuid.uuid4().hex[:6]}"
    client = None
    try:
        hold_gpus(env, "gridengine", hog, "00:10:00", 300)
        hold_gpus(env, "testsite", hog, "00:10:00", 300)
        client = subprocess.Popen([*OFFLOAD, "run", "--site", "gridengine,testsite", "--policy", "failover",
                                   "--patience", "3", "--gpus", "1", *payload(marker)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        attempts = wait_until(lambda: {a["site"]: a for p in placements(env) for a in p["attempts"]
                                       if a["job_id"]} if len([a for p in placements(env) for a in p["attempts"]
                                                               if a["job_id"]]) == 2 else None,
                              timeout=120, what="an attempt on each site")  # fmt: skip
        assert attempts["gridengine"]["overdue"] and attempts["gridengine"]["state"] == "queued", attempts
        offload(env, "cancel", "--site", "testsite", "--name", hog)  # SLURM's load ends: the job starts there
        out, err = client.communicate(timeout=240)
    finally:
        if client is not None and client.poll() is None:
            client.send_signal(signal.SIGINT)
            client.communicate(timeout=120)
        for site in ("gridengine", "testsite"):
            offload(env, "cancel", "--site", site, "--name", hog)
    assert client.returncode == 0, err
    assert out.count(marker) == 1, out
    assert "gridengine: attempt" in err and "past its expected start" in err, err
    [placement] = placements(env)
    attempts = {a["site"]: a for a in placement["attempts"]}
    assert attempts["testsite"]["state"] == "claimed", placement
    assert attempts["gridengine"]["state"] == "released" and attempts["gridengine"]["overdue"], placement
    no_job_left(site_user)
    assert runs(placement, marker) == 1, placement


def test_jupyter_raced_over_two_clusters_starts_where_a_gpu_is_free_and_only_there(env, site_user):
    """``offload jupyter --policy race`` over the two SLURM clusters, the test site's GPUs all held: an attempt on
    each (each made for its own site: its Python, its notebooks folder), the second cluster's starts and is
    claimed, the test site's is released and cancelled; the kernel runs on the second cluster's node with the GPU
    SLURM gave it there. Ctrl-C ends the session and its job; nothing is left on either cluster."""
    from .test_jupyter import run_cell

    hog = f"hog-{uuid.uuid4().hex[:6]}"
    proc = None
    try:
        hold_gpus(env, "testsite", hog, "00:10:00", 300)
        proc = subprocess.Popen([*OFFLOAD, "jupyter", "--site", "@slurms", "--policy", "race", "--gpus", "1",
                                 "--no-browser"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        url = proc.stdout.readline().strip()
        assert "/lab?token=" in url, proc.stderr.read() if proc.poll() is not None else url
        base, token = url.split("/lab?token=")
        printed = run_cell(base, token, "import os, socket; print(socket.gethostname(), "
                                        "os.environ['CUDA_VISIBLE_DEVICES'])")  # fmt: skip
        host, gpus = printed.split()
        assert host.startswith("second") and gpus in ("0", "1"), printed
        [placement] = placements(env)
        states = {a["site"]: a["state"] for a in placement["attempts"]}
        assert states == {"second": "claimed", "testsite": "released"}, placement
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C ends the session and the job
            _, err = proc.communicate(timeout=120)
        offload(env, "cancel", "--site", "testsite", "--name", hog)
    assert proc.returncode == 130 and "cancelled job" in err, err
    assert "second: attempt" in err and "claimed" in err, err
    wait_until(lambda: not leftovers.site_jobs(site_user), timeout=90, what="no job left on either cluster")
