"""One job, two real sites: the test site's SLURM cluster and its Grid Engine cell, named together as a group
in one profile file. The job goes where it starts first, a site that cannot run it is skipped with its reason,
and nothing is submitted when no site can run it. Nothing is stubbed: the evidence is each site's own sinfo or
qhost, over the test site's sshd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from .conftest import CONFIG, queued_jobs, wait_until

OFFLOAD = [sys.executable, "-m", "offload.cli"]


@pytest.fixture
def both(testsite_config):
    """The test site's profile: both sites and the group @both (SLURM first, as a user would list their home
    site)."""
    return {**os.environ, "OFFLOAD_CONFIG": str(CONFIG)}


def offload(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*OFFLOAD, *args], capture_output=True, text=True, timeout=240, env=env)


def test_the_job_goes_where_its_gpu_is_free_now(both, site_user):
    hog = f"hog-{uuid.uuid4().hex[:6]}"  # every GPU of the SLURM cluster, taken by another job
    held = offload(both, "run", "--site", "testsite", "--detach", "--nodes", "2", "--gpus-per-node", "2", "--name",
                   hog, "--", "sleep", "300")  # fmt: skip
    assert held.returncode == 0, held.stderr
    try:
        wait_until(lambda: "RUNNING" in offload(both, "status", held.stdout.strip()).stdout, timeout=90,
                   what="the hog to run")  # fmt: skip
        ranked = json.loads(offload(both, "sites", "rank", "--site", "@both", "--gpus", "1", "--json").stdout)
        assert [(v["site"], v["feasible"], v["starts_now"]) for v in ranked] == [
            ("gridengine", True, True), ("testsite", True, False)], ranked  # fmt: skip
        code = "import os; print('gpus', os.environ.get('CUDA_VISIBLE_DEVICES', 'none'))"
        result = offload(both, "run", "--site", "@both", "--gpus", "1", "--", "python3", "-c", code)
        assert result.returncode == 0, result.stderr
        assert "to site 'gridengine'" in result.stderr and "testsite: would wait" in result.stderr, result.stderr
        assert result.stdout.startswith("gpus "), result.stdout
    finally:
        offload(both, "cancel", "--name", hog)
    wait_until(lambda: queued_jobs(site_user, hog) == [], timeout=60, what="the hog to go")


def test_a_job_no_site_can_run_is_refused_with_each_sites_reason_and_nothing_queued(both, site_user):
    before = queued_jobs(site_user)
    result = offload(both, "run", "--site", "testsite,gridengine", "--gpus-per-node", "3", "--", "true")
    assert result.returncode != 0
    assert "no site of testsite,gridengine can run this job" in result.stderr, result.stderr
    # each site's own words: its profile knows it has 2 GPUs a node, before any scheduler is asked
    assert "testsite: " in result.stderr and "gridengine: " in result.stderr and "has 2" in result.stderr
    assert queued_jobs(site_user) == before


def test_rank_shows_every_site_with_its_evidence(both):
    result = offload(both, "sites", "rank", "--site", "@both", "--gpus", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:2] == ["SITE", "VERDICT"]
    assert {line.split()[0] for line in lines[1:]} == {"testsite", "gridengine"}
    unknown = offload(both, "sites", "rank", "--site", "@bth")
    assert unknown.returncode != 0 and "did you mean '@both'" in unknown.stderr.replace('"', "'"), unknown.stderr


@pytest.mark.parametrize("policy", ["first-fit", "race"])
def test_the_example_places_its_job_on_one_of_the_two_sites(both, policy, tmp_path):
    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "any_free_site.py")
    env = {**both, "OFFLOAD_STATE_DIR": str(tmp_path / "state")}
    result = subprocess.run([sys.executable, example, "--sites", "@both", "--gpus", "1", "--policy", policy],
                            capture_output=True, text=True, timeout=240, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "submitted job" in result.stderr and "COMPLETED" in result.stderr, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout  # one run, whatever the policy
    if policy == "race":
        assert "claimed" in result.stderr and "released" in result.stderr, result.stderr


def test_offload_jupyter_on_a_group_starts_on_one_of_its_sites(both, site_user):
    """``offload jupyter --site @both --detach``: the server is submitted once, to the site the ranking chose."""
    result = offload(both, "jupyter", "--site", "@both", "--detach", "--no-browser", "--time", "00:05:00")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    try:
        assert f"submitted JupyterLab as job {job_id} to 'testsite'" in result.stderr or (
            f"submitted JupyterLab as job {job_id} to 'gridengine'" in result.stderr), result.stderr  # fmt: skip
    finally:
        site = "testsite" if "to 'testsite'" in result.stderr else "gridengine"
        offload(both, "cancel", job_id, "--site", site)


def test_a_dask_cluster_on_a_group_goes_whole_to_the_site_where_its_workers_start_first(both, site_user):
    """``OffloadCluster(site="@both")`` with every CPU of the SLURM cluster taken by another job: the scheduler job
    and the workers all go to Grid Engine (one site, so they never talk across sites), and compute there. Each
    site is judged with the worker job as built for it (SLURM reserves the worker's cores, Grid Engine gives a
    slot per host and is asked for none)."""
    import socket

    from dask.distributed import Client

    from dask_offload import OffloadCluster

    hog = f"hog-{uuid.uuid4().hex[:6]}"
    held = offload(both, "run", "--site", "testsite", "--detach", "--nodes", "3", "--cpus", "16", "--name", hog,
                   "--", "sleep", "300")  # fmt: skip
    assert held.returncode == 0, held.stderr
    try:
        wait_until(lambda: "RUNNING" in offload(both, "status", held.stdout.strip()).stdout, timeout=90,
                   what="the hog to run")  # fmt: skip
        os.environ["OFFLOAD_CONFIG"] = both["OFFLOAD_CONFIG"]
        name = f"group-{uuid.uuid4().hex[:6]}"
        with OffloadCluster(site="@both", n_workers=2, processes=1, memory="1GiB", name=name) as cluster:
            with Client(cluster) as client:
                client.wait_for_workers(2, timeout=180)
                assert set(client.run(socket.gethostname).values()) <= {"ge1", "ge2"}
                assert sum(client.gather(client.map(lambda x: x + 1, range(4)))) == 10
    finally:
        offload(both, "cancel", "--name", hog)
    wait_until(lambda: queued_jobs(site_user, hog) == [], timeout=60, what="the hog to go")
