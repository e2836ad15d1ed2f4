"""Jobs that span nodes: one copy of the payload per node (or per task), each in its own container, each told
its rank and where the first node listens, each seeing its own node's GPUs."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import offload
from offload import ConfigError, JobSpec, JobState, Resources

from .conftest import queued_jobs

OFFLOAD = [sys.executable, "-m", "offload.cli"]
EXAMPLES = Path(__file__).parents[2] / "examples"
WHO = ("import os, socket; print('who', socket.gethostname(), os.environ['RANK'], os.environ['NODE_RANK'], "
       "os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE'], os.environ.get('CUDA_VISIBLE_DEVICES', '-'), "
       "os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'])")  # fmt: skip


def offload_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*OFFLOAD, *args], capture_output=True, text=True, timeout=180,
                          env={**os.environ, **(env or {})})  # fmt: skip


def copies(stdout: str) -> list[list[str]]:
    """The ``who`` lines of the copies, without offload's ``[node:rank]`` prefix, sorted by rank."""
    rows = [line.split("] ", 1)[1].split()[1:] for line in stdout.splitlines() if "] who " in line]
    return sorted(rows, key=lambda row: int(row[1]))


def test_two_nodes_run_one_copy_each_with_ranks_and_the_first_nodes_address():
    result = offload_cli("run", "--site", "testsite", "--nodes", "2", "--", "python3", "-c", WHO)
    assert result.returncode == 0, result.stderr
    rows = copies(result.stdout)
    assert [row[1:5] for row in rows] == [["0", "0", "0", "2"], ["1", "1", "0", "2"]]
    hosts = [row[0] for row in rows]
    assert len(set(hosts)) == 2, hosts  # two distinct nodes
    master_addr, master_port = rows[0][6], rows[0][7]
    assert all(row[6:] == [master_addr, master_port] for row in rows)
    assert master_addr.startswith("10.231.77.")  # the first node's address on the cluster network
    # every line of a copy is prefixed with its node and rank
    assert any(line.startswith(f"[{hosts[1]}:1] ") for line in result.stdout.splitlines())


def test_an_all_reduce_across_two_nodes_gives_the_right_sum():
    example = str(EXAMPLES / "multinode_allreduce.py")
    result = offload_cli("run", "--site", "testsite", "--nodes", "2", "--file", example, "--", "python3",
                         "multinode_allreduce.py")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    sums = [line for line in result.stdout.splitlines() if ": sum " in line]
    assert len(sums) == 2 and all(line.endswith("sum 3") for line in sums), result.stdout


def test_tasks_per_node_and_gpus_per_node():
    result = offload_cli("run", "--site", "testsite", "--nodes", "2", "--tasks-per-node", "2", "--gpus-per-node", "2",
                         "--", "python3", "-c", WHO)  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = copies(result.stdout)
    assert [row[1] for row in rows] == ["0", "1", "2", "3"]
    assert all(row[4] == "4" for row in rows)  # WORLD_SIZE counts every copy
    assert sorted((row[2], row[3]) for row in rows) == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert {row[5] for row in rows} == {"0,1"}  # each copy sees its own node's two GPUs
    assert len({row[0] for row in rows}) == 2


def test_a_copy_failing_on_the_second_node_fails_the_job_with_its_exit_code(site, site_user):
    code = ("import os, sys, time; rank = int(os.environ['RANK']); "
            "time.sleep(0 if rank == 1 else 60); sys.exit(7 if rank == 1 else 0)")  # fmt: skip
    job = site.submit(JobSpec(["python3", "-c", code], resources=Resources(nodes=2), name="copyfail"))
    status = job.wait(timeout=120)
    assert status.state is JobState.FAILED and status.exit_code == 7
    log = job.tail(50)
    hosts = {line.split(":")[0].strip("[") for line in log.splitlines() if line.startswith("[")}
    assert "offload: copy 1 on " in log and "exit code 7" in log, log
    assert "failed first" in log
    assert queued_jobs(site_user, "copyfail") == []  # the healthy copy did not keep the job alive for 60 s
    assert hosts <= {"node1", "node2", "node3"}


def test_gpu_requests_are_exact_in_every_syntax():
    site = offload.Site(offload.load_site("testsite").config.with_overrides(scheduler_keys={"gpu_request": "--gres"}))
    try:
        script = site.job_script(JobSpec(["true"], resources=Resources(nodes=2, gpus=4)))
        assert "#SBATCH --gres=gpu:2" in script  # 2 per node on 2 nodes: the 4 asked for
        with pytest.raises(ConfigError, match="cannot be split evenly"):
            site.job_script(JobSpec(["true"], resources=Resources(nodes=2, gpus=3)))
        job = site.submit(JobSpec(["python3", "-c", WHO], resources=Resources(nodes=2, gpus=4)))
        assert job.wait(timeout=120).state is JobState.COMPLETED
        assert {row[5] for row in copies("\n".join(job.logs()))} == {"0,1"}
    finally:
        site.close()


def test_sites_gpus_shows_free_and_total_per_partition_and_node():
    result = offload_cli("sites", "gpus", "testsite", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["site"] == "testsite"
    gpu = report["partitions"]["gpu"]
    assert gpu["gpus"] == 4 and sorted(gpu["nodes"]) == ["node1", "node2"]
    assert {n["name"]: n["gpus"] for n in report["nodes"]} == {"node1": 2, "node2": 2, "node3": 0}
    assert 0 <= gpu["gpus_free"] <= 4
    table = offload_cli("sites", "gpus", "testsite")
    assert "GPUS FREE/TOTAL" in table.stdout and "node3" in table.stdout


def test_accounting_records_the_jobs_offload_ran(site):
    job = site.submit(JobSpec(["true"], name="accounted"))
    assert job.wait(timeout=60).state is JobState.COMPLETED
    out = ""
    for _ in range(60):  # slurmctld hands the record to slurmdbd asynchronously, and in parts
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job.id, "--format=JobID,JobName,State"],
                             capture_output=True, text=True).stdout  # fmt: skip
        if f"{job.id}|accounted|COMPLETED" in out:
            break
        time.sleep(0.5)
    assert f"{job.id}|accounted|COMPLETED" in out
