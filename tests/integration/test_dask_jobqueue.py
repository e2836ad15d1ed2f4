"""OffloadCluster as a drop-in for dask-jobqueue's SLURMCluster, on the test site: the same keywords reach the
job and the workers with the same meaning, a jobqueue.yaml carries over, and each worker's log is at hand."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

from distributed import Client

from dask_offload import OffloadCluster

from .conftest import queued_jobs

EXAMPLES = Path(__file__).parents[2] / "examples"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def scontrol(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(word.split("=", 1) for word in out.split() if "=" in word)


def test_cores_processes_and_memory_mean_the_same_as_in_dask_jobqueue(site_user):
    name = unique("jq")
    with OffloadCluster(site="testsite", cores=2, processes=2, memory="800MB", n_workers=2, name=name) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            assert sorted(w["nthreads"] for w in workers) == [1, 1]
            assert sorted(w["memory_limit"] for w in workers) == [400_000_000, 400_000_000]
            worker_job = [job for job in cluster.jobs if job is not cluster.scheduler.job]
            assert len(worker_job) == 1  # both workers in one job
            job = scontrol(worker_job[0].id)
            assert job["NumCPUs"] == "2" and job["MinMemoryNode"] == "763M"  # 800 MB asked as SLURM counts it
    assert queued_jobs(site_user, name) == []


def test_every_jobqueue_keyword_reaches_the_job_or_its_workers(site_user, tmp_path):
    name = unique("keywords")
    logs = f"/home/{site_user}/offload/jq-logs-{name}"
    with OffloadCluster(
        site="testsite", cores=2, processes=1, memory="1GB", n_workers=1, name=name, queue="cpu",
        job_extra_directives=["--comment=from-jobqueue"], job_directives_skip=["--mem"],
        job_script_prologue=['echo "prologue ran" > "$OFFLOAD_JOB_DIR/prologue"'], shebang="#!/bin/bash -l",
        worker_extra_args=["--lifetime", "50m", "--resources", "SPECIAL=3"], death_timeout=77,
        local_directory="/tmp/offload-dask-scratch", log_directory=logs, interface="eth0", nanny=True,
        scheduler_options={"allowed_failures": 7},
    ) as cluster:  # fmt: skip
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=180)
            job = next(job for job in cluster.jobs if job is not cluster.scheduler.job)
            control = scontrol(job.id)
            assert control["Comment"] == "from-jobqueue" and control["Partition"] == "cpu"
            assert control["MinMemoryCPU"] == "1G"  # --mem skipped: the site's DefMemPerCPU applies
            jobdir = Path(job.ref.jobdir)
            assert (jobdir / "prologue").read_text().strip() == "prologue ran"
            assert (jobdir / "job.sh").read_text().startswith("#!/bin/bash -l\n")
            assert any(Path(logs).glob(f"{name}-*.out"))  # the worker job's log, in log_directory too
            seen = client.run(lambda dask_worker: (dask_worker.lifetime, dask_worker.death_timeout,
                                                   dask_worker.local_directory, dask_worker.address,
                                                   dask_worker.state.total_resources))  # fmt: skip
            lifetime, death, scratch, address, resources = next(iter(seen.values()))
            assert 2900 <= lifetime <= 3000 and death == 77 and scratch.startswith("/tmp/offload-dask-scratch")
            assert address.split("://")[1].startswith("10.231.77.")  # eth0 on the node
            assert resources == {"SPECIAL": 3.0}
            assert client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures) == 7
            before = set(client.scheduler_info()["workers"])
            client.restart()  # with a nanny, workers restart in place: the job stays
            client.wait_for_workers(1, timeout=120)
            assert set(client.scheduler_info()["workers"]) != before and job in cluster.jobs
    assert queued_jobs(site_user, name) == []


def test_a_jobqueue_yaml_carries_over_and_offloads_config_and_keywords_win(tmp_path, testsite_config):
    (tmp_path / "jobqueue.yaml").write_text("jobqueue:\n  slurm:\n    cores: 4\n    processes: 2\n    memory: 3GB\n"
                                            "    queue: cpu\n    walltime: '00:40:00'\n")  # fmt: skip
    (tmp_path / "offload.yaml").write_text("offload:\n  memory: 2GB\n")
    program = textwrap.dedent("""
        from dask_offload import OffloadCluster
        with OffloadCluster(site="testsite", scheduler="local", walltime="00:50:00") as cluster:
            print(cluster.job_script())
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DASK_CONFIG": str(tmp_path)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    script = result.stdout
    assert "#SBATCH --cpus-per-task=4" in script  # jobqueue.yaml
    assert "#SBATCH --partition=cpu" in script  # jobqueue's queue
    assert "#SBATCH --mem=1908M" in script  # offload.yaml won over jobqueue's 3GB
    assert "#SBATCH --time=00:50:00" in script  # the keyword won over both
    assert '"nthreads": 2' in script and '"memory_limit": 1000000000' in script


def test_get_logs_maps_each_worker_to_its_log(site_user):
    name = unique("logs")
    with OffloadCluster(site="testsite", processes=2, memory="2GB", n_workers=2, name=name) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(2, timeout=120)
            joined = time.monotonic()
            addresses = {info["name"]: address for address, info in client.scheduler_info()["workers"].items()}
            while True:
                logs = cluster.get_logs()
                if all(address in logs.get(worker, "") for worker, address in addresses.items()):
                    break
                assert time.monotonic() - joined < 30, {k: v[-300:] for k, v in logs.items()}
                time.sleep(1)
            assert "Scheduler at:" in logs["Scheduler"]
            assert set(addresses) <= set(logs)
    assert queued_jobs(site_user, name) == []


def test_the_jobqueue_example_runs_on_the_test_site(testsite_config):
    result = subprocess.run([sys.executable, str(EXAMPLES / "dask_from_jobqueue.py"), "--site", "testsite"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "4 workers with [1, 1, 1, 1] threads; sum: 5050" in result.stdout
