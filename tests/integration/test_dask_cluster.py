"""OffloadCluster on the test site: scheduler job behind an SSH port forward, TLS, GPU workers in Charliecloud.

Covers what dask-jobqueue's generic tests cover (job start/stop, scale, adapt with min/max jobs, worker naming,
job script contents, security on), written for OffloadCluster, plus what jobqueue cannot do."""

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
from collections import Counter

import dask
import pytest
from distributed import Client

import offload
from dask_offload import OffloadCluster
from dask_offload.cluster import VersionMismatchError

from .conftest import STATE, queued_jobs, wait_until


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def tasks():
    """Task functions made here, not at module level, so they travel by value (workers cannot import tests)."""

    def gpu_of_task(i):
        time.sleep(0.2)
        return socket.gethostname(), os.environ["CUDA_VISIBLE_DEVICES"]

    def slow(x):
        time.sleep(0.5)
        return x

    return gpu_of_task, slow


def test_four_gpu_workers_each_pinned_to_its_own_gpu(site_user):
    # 4 GPUs on a site with 2 per node: two worker jobs of two workers, on the two GPU nodes, each worker pinned
    # to its own GPU, all reaching the scheduler job wherever it runs.
    name = unique("gpus")
    with OffloadCluster(site="testsite", gpus=4, name=name) as cluster, Client(cluster) as client:
        client.wait_for_workers(4, timeout=120)
        assert len(queued_jobs(site_user, name)) == 3  # the scheduler's job and two jobs of two workers
        seen = client.run(lambda: (socket.gethostname(), os.environ["CUDA_VISIBLE_DEVICES"]))
        assert sorted(seen.values()) == [("node1", "0"), ("node1", "1"), ("node2", "0"), ("node2", "1")]
        info = client.scheduler_info(n_workers=-1)["workers"].values()
        assert sorted(w["name"] for w in info) == [f"{name}-{j}-{i}" for j in range(2) for i in range(2)]
        assert all(w["resources"] == {"GPU": 1} for w in info)
        gpu_of_task, _ = tasks()
        futures = [client.submit(gpu_of_task, i, resources={"GPU": 1}, pure=False) for i in range(40)]
        counts = Counter(client.gather(futures))
        assert sum(counts.values()) == 40
        assert set(counts) == {("node1", "0"), ("node1", "1"), ("node2", "0"), ("node2", "1")}, counts
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
    assert queued_jobs(site_user, name) == []


def test_scale_up_and_down_in_workers_and_jobs(site_user):
    name = unique("scale")
    # two workers per job, one thread each (cores and memory are the job's, as in dask-jobqueue)
    with OffloadCluster(site="testsite", processes=2, cores=2, memory="2GiB", name=name) as cluster:
        with Client(cluster) as client:
            assert queued_jobs(site_user, name) != []  # the scheduler job
            cluster.scale(4)
            client.wait_for_workers(4, timeout=120)
            assert len(cluster.worker_spec) == 2
            names = sorted(w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values())
            assert names == [f"{name}-0-0", f"{name}-0-1", f"{name}-1-0", f"{name}-1-1"]
            cluster.scale(jobs=3)
            client.wait_for_workers(6, timeout=120)
            cluster.scale(2)
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, what="scale down to 2 workers")
            wait_until(lambda: len(queued_jobs(site_user, name)) == 2, what="one worker job left")
            cluster.scale(0)
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 0, what="scale down to 0")
            wait_until(lambda: len(queued_jobs(site_user, name)) == 1, what="only the scheduler job left")
    assert queued_jobs(site_user, name) == []


def test_adapt_scales_up_under_load_and_back_to_zero(site_user):
    name = unique("adapt")
    with OffloadCluster(site="testsite", gpus=0, processes=1, memory="1GiB", name=name) as cluster:
        cluster.adapt(minimum=0, maximum=4, interval="300ms", wait_count=2)
        with Client(cluster) as client:
            _, slow = tasks()
            futures = client.map(slow, range(40))
            wait_until(lambda: len(client.scheduler_info()["workers"]) >= 2, timeout=120, what="adaptive scale-up")
            assert client.gather(futures) == list(range(40))
            assert len(cluster.worker_spec) <= 4
            del futures
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 0, timeout=120, what="scale to zero")
            wait_until(lambda: len(queued_jobs(site_user, name)) == 1, what="worker jobs gone")


def test_adapt_with_minimum_and_maximum_jobs(site_user):
    name = unique("adaptjobs")
    with OffloadCluster(site="testsite", processes=2, memory="1GiB", name=name) as cluster:
        cluster.adapt(minimum_jobs=1, maximum_jobs=2, interval="300ms", wait_count=2)
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)  # the minimum: one job of two workers
            _, slow = tasks()
            futures = client.map(slow, range(60))
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 4, timeout=120, what="two jobs")
            assert len(queued_jobs(site_user, name)) <= 3
            client.gather(futures)
            del futures
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=120, what="back to one job")


def test_job_script_and_security(site_user):
    name = unique("script")
    with OffloadCluster(site="testsite", gpus=2, walltime="00:20:00", name=name, env={"MODE": "x"}) as cluster:
        script = cluster.job_script()
        assert "#SBATCH --gpus=2" in script and "#SBATCH --time=00:20:00" in script
        assert f"#SBATCH --job-name={name}" in script and "--partition=gpu" in script
        assert "export MODE=x" in script
        assert "BEGIN" not in script and "PRIVATE KEY" not in script  # certificates are secrets, never in scripts
        assert cluster.security.require_encryption
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            assert all(a.startswith("tls://") for a in client.scheduler_info()["workers"])
            with pytest.raises(OSError):  # without the cluster's certificates the scheduler refuses us
                Client(cluster.scheduler_address.replace("tls://", "tcp://"), timeout="3s")
            jobdir = cluster.jobs[0].ref.jobdir
            # The certificates were read by the job, which removed its secrets file at once: not on disk.
            assert subprocess.run(["stat", "-c", "%a", jobdir], capture_output=True, text=True).stdout.strip() == "700"
            assert not os.path.exists(f"{jobdir}/secrets.env")
            # The dashboard listens on the node's loopback only; the client reaches it through the job's relay.
            page = urllib.request.urlopen(cluster.dashboard_link, timeout=60).read()
            assert b"Dask" in page or b"bokeh" in page.lower()


def test_a_lost_worker_job_is_replaced_and_the_user_told_once(site_user, caplog):
    name = unique("lost")
    caplog.set_level(logging.WARNING, logger="dask_offload")
    with OffloadCluster(site="testsite", processes=1, memory="1GiB", n_workers=2, name=name) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            victim = cluster.jobs[1]
            subprocess.run(["scancel", victim.id], check=True)  # an admin, a node failure, a walltime...
            wait_until(lambda: victim.id not in [j.id for j in cluster.jobs], timeout=60, what="loss noticed")
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=120, what="replacement")
            assert len(queued_jobs(site_user, name)) == 3
    told = [r for r in caplog.records if "ended CANCELLED" in r.getMessage()]
    assert len(told) == 1 and "replacing it" in told[0].getMessage()


def test_an_image_without_matching_distributed_is_reported_before_any_worker(site_user):
    name = unique("mismatch")
    with pytest.raises(Exception) as err:
        OffloadCluster(site="testsite", gpus=1, image=str(STATE / "images" / "bare"), name=name)
    assert isinstance(err.value.__cause__, VersionMismatchError)
    assert "no distributed" in str(err.value) and "Install distributed==" in str(err.value)
    assert queued_jobs(site_user, name) == []


def test_a_scheduler_in_the_client_process_unreachable_from_the_nodes_is_said_at_once(site_user):
    # The test site's nodes cannot reach this machine (as on most sites): asking for workers of a scheduler in
    # this process is refused before any job is queued, naming the way that works.
    name = unique("localsched")
    with pytest.raises(offload.ConfigError, match="scheduler='site'"):
        OffloadCluster(site="testsite", scheduler="local", n_workers=2, memory="1GiB", name=name)
    assert queued_jobs(site_user, name) == []


async def test_asynchronous_cluster(site_user):
    name = unique("async")
    async with OffloadCluster(site="testsite", gpus=2, name=name, asynchronous=True) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2)
            result = await client.submit(lambda: 6 * 7, resources={"GPU": 1})
            assert result == 42
    assert queued_jobs(site_user, name) == []


CLIENT = """
import sys, time
import offload
from dask_offload import OffloadCluster
cluster = OffloadCluster(site="testsite", gpus=2, name=sys.argv[1])
client = cluster.get_client()
client.wait_for_workers(2, timeout=120)
print("ready", flush=True)
time.sleep(600)
"""


def cancel_leftovers(name: str) -> None:
    """Whatever a failed test left must not hold GPUs for the tests after it."""
    subprocess.run([sys.executable, "-m", "offload.cli", "cancel", "--name", name], capture_output=True, timeout=120)


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT"])
def test_killing_the_client_cancels_every_job(site_user, how, tmp_path):
    name = unique(how.lower())
    errors = (tmp_path / "client.err").open("w")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLIENT), name], stdout=subprocess.PIPE,
                            stderr=errors, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(queued_jobs(site_user, name)) == 2
        proc.send_signal(getattr(signal, how))
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the client did not exit on {how}:\n{(tmp_path / 'client.err').read_text()[-4000:]}")
        assert queued_jobs(site_user, name) == [], (tmp_path / "client.err").read_text()[-4000:]
    finally:
        proc.kill()
        errors.close()
        cancel_leftovers(name)


def test_offload_cancel_cleans_up_after_a_crashed_client(site_user):
    name = unique("crash")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLIENT), name], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready", cancel_leftovers(name)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait(timeout=30)
    assert len(queued_jobs(site_user, name)) == 2
    listing = subprocess.run([sys.executable, "-m", "offload.cli", "status", "--name", name], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert listing.stdout.count(name) == 2
    result = subprocess.run([sys.executable, "-m", "offload.cli", "cancel", "--name", name], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert queued_jobs(site_user, name) == []


def test_a_crashed_clients_jobs_end_by_themselves(site_user):
    """Nobody runs 'offload cancel': the scheduler job ends once no client talked to it for its idle timeout,
    and its workers once their scheduler is gone for their death timeout."""
    name = unique("abandoned")
    env = {**os.environ, "DASK_OFFLOAD__SCHEDULER_IDLE_TIMEOUT": "15", "DASK_OFFLOAD__DEATH_TIMEOUT": "10"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CLIENT), name], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready", cancel_leftovers(name)
    proc.kill()
    proc.wait(timeout=30)
    try:
        wait_until(lambda: queued_jobs(site_user, name) == [], timeout=150, what="the abandoned jobs to end")
    finally:
        cancel_leftovers(name)


def test_a_scheduler_job_that_dies_is_reported_at_once(site_user, caplog):
    name = unique("schedkill")
    with caplog.at_level(logging.ERROR, logger="dask_offload"), dask.config.set({"offload.death_timeout": 10}):
        with OffloadCluster(site="testsite", n_workers=1, memory="1GiB", name=name) as cluster:
            with Client(cluster) as client:
                client.wait_for_workers(1, timeout=120)
                dashboard = client.scheduler_info()["services"]["dashboard"]
                node_address = cluster.scheduler.contact_address.split("://")[1].rsplit(":", 1)[0]
                with pytest.raises(OSError):  # the dashboard is not on the node's address, only its loopback
                    socket.create_connection((node_address, dashboard), timeout=5).close()
                subprocess.run(["scancel", cluster.scheduler.job.id], check=True)
                wait_until(lambda: "scheduler's job" in caplog.text, timeout=60, what="the report")
                # its worker notices and ends too, instead of waiting for its walltime
                wait_until(lambda: queued_jobs(site_user, name) == [], timeout=120, what="the worker job to end")
    assert "cannot work any more" in caplog.text
