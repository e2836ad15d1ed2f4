"""The test site's second SLURM cluster (``scripts/testsite-slurm2``): a separate centre beside the first, with its
own ClusterName, slurmctld, nodes, accounting and login node (sshd on 127.0.0.1:2223, whose sessions' Slurm
commands talk to it). Both clusters number their jobs from 1, so a job is known by its site and its id together.
The evidence is each cluster's own tools, over OpenSSH with the host key checked, and offload's job records."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

import offload
from offload import JobSpec, JobState, Resources
from offload.records import JobRecords

from .conftest import STATE, wait_until

SECOND_CONF = "/etc/slurm-second/slurm.conf"  # the second cluster's client config on the login node


def ssh(port: int, *command: str, check: bool = True, known_hosts: str | None = None) -> subprocess.CompletedProcess:
    argv = ["ssh", "-p", str(port), "-i", str(STATE / "id_ed25519"), "-o",
            f"UserKnownHostsFile={known_hosts or STATE / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes", "-o",
            "BatchMode=yes", "hpcuser@127.0.0.1", shlex.join(command)]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def settings(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if " = " in line)
    return {k.strip(): v.strip() for k, v in pairs}


def second(*argv: str, check: bool = True) -> str:
    """A Slurm command as root on the login node, against the second cluster."""
    env = {**os.environ, "SLURM_CONF": SECOND_CONF}
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60, env=env).stdout


def test_the_second_cluster_is_a_centre_of_its_own(testsite_config):
    first = settings(ssh(2222, "scontrol", "show", "config").stdout)
    other = settings(ssh(2223, "scontrol", "show", "config").stdout)
    assert first["ClusterName"] == "offload-testsite" and other["ClusterName"] == "second"
    for key in ("SlurmctldPort", "StateSaveLocation", "SlurmdSpoolDir", "AccountingStoragePort"):
        assert first[key] != other[key], key
    # its own nodes, and its own accounting, which knows no other cluster
    nodes = ssh(2223, "sinfo", "--noheader", "--Node", "--format=%N %G").stdout.split("\n")
    assert sorted(line for line in nodes if line) == ["second1 gpu:2", "second2 gpu:2"]
    assert ssh(2223, "sacctmgr", "--noheader", "--parsable2", "list", "cluster", "format=cluster").stdout.split() == [
        "second"
    ]
    # its job ids are a sequence of its own from 1, not the first cluster's: the first job its accounting ever saw
    # is one of its first few. Not always 1: `sbatch --test-only` (offload's plans) takes an id and leaves no
    # record, and a race earlier in the run may have asked for a plan here before any job ran.
    # (on a cold site, as in CI, nothing may have run there yet: one job first, so its accounting has something)
    assert first["FirstJobId"] == other["FirstJobId"] == "1"
    ssh(2223, "sbatch", "--wait", "--quiet", "--job-name=first-ever", "--wrap", "true")

    def ever() -> str:
        return second("sacct", "--noheader", "--allusers", "--allocations", "--starttime=2000-01-01",
                      "--format=JobID")  # fmt: skip

    lowest = int(wait_until(ever, timeout=60, what="the second cluster's accounting records").split()[0])
    assert lowest < 10, ever()  # the first cluster's ids are in the hundreds by now
    # its login node has a host key of its own, checked against the site's known_hosts like the first's
    keys = dict(line.split(" ", 1) for line in (STATE / "known_hosts").read_text().splitlines() if line)
    assert keys["[127.0.0.1]:2222"] != keys["[127.0.0.1]:2223"]
    only_first = STATE / "known_hosts"
    alone = only_first.with_name("known_hosts.first-only.test")
    alone.write_text(f"[127.0.0.1]:2222 {keys['[127.0.0.1]:2222']}\n")
    try:
        refused = ssh(2223, "true", check=False, known_hosts=str(alone))
        assert refused.returncode != 0 and "Host key verification failed" in refused.stderr, refused.stderr
    finally:
        alone.unlink()


def test_each_cluster_numbers_its_own_jobs(testsite_config):
    def submit(port: int) -> int:
        return int(ssh(port, "sbatch", "--parsable", "--output=/dev/null", "--wrap=true").stdout.strip())

    a1, b1, a2, b2 = submit(2222), submit(2223), submit(2222), submit(2223)
    assert (a2, b2) == (a1 + 1, b1 + 1), (a1, b1, a2, b2)  # a job on one does not move the other's counter
    assert a1 != b1
    wait_until(lambda: not second("squeue", "--noheader", f"--jobs={b1},{b2}", check=False).strip(), timeout=60,
               what="the second cluster's jobs to end")  # fmt: skip


def test_offload_runs_a_job_on_the_second_cluster_with_its_gpus_and_reads_its_end(testsite_config):
    site = offload.load_site("second")
    code = (
        "import os, socket; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['SLURM_CLUSTER_NAME'],"
        " socket.gethostname())"
    )
    job = site.submit(JobSpec(["python3", "-c", code], resources=Resources(gpus=2), name="second-gpus"))
    status = job.wait(timeout=120)
    log = list(job.logs())
    assert status.state is JobState.COMPLETED and status.exit_code == 0, (status, log)
    gpus, cluster, host = log[-1].split()
    assert (gpus, cluster) == ("0,1", "second") and host in ("second1", "second2"), log
    assert job.ref.jobdir.startswith(site.workdir()) and "offload-second" in site.workdir()
    # the cluster's own accounting has it (so a client that comes back after slurmctld forgot it reads its end)
    accounted = ssh(2223, "sacct", "--noheader", "--allocations", "--parsable2", f"--jobs={job.id}",
                    "--format=JobID,State,ExitCode,Cluster").stdout.split()  # fmt: skip
    assert accounted == [f"{job.id}|COMPLETED|0:0|second"], accounted


def test_a_job_on_both_nodes_of_the_second_cluster(testsite_config):
    """srun inside a job, between the second cluster's nodes and back to its slurmctld (SrunPortRange)."""
    site = offload.load_site("second")
    spec = JobSpec(["sh", "-c", 'echo "$NODE_RANK $(hostname)"'], resources=Resources(nodes=2), name="second-2n")
    job = site.submit(spec)
    status = job.wait(timeout=120)
    log = list(job.logs())
    assert status.state is JobState.COMPLETED, (status, log)
    assert {line.split()[-1] for line in log if line.strip()} >= {"second1", "second2"}, log


def test_a_fresh_client_reads_the_end_of_a_job_slurmctld_forgot(testsite_config):
    """After MinJobAge (30 s) squeue no longer knows the job: its end comes from the second cluster's own
    accounting (or the job's exit code file), never from the first cluster's."""
    site = offload.load_site("second")
    job = site.submit(JobSpec(["sh", "-c", "exit 3"], name="second-forgotten"))
    assert job.wait(timeout=120).exit_code == 3
    listed = ("squeue", "--noheader", "--states=all", f"--jobs={job.id}")
    wait_until(lambda: not second(*listed, check=False).strip(), timeout=150, interval=2,
               what="slurmctld to forget the job")  # fmt: skip
    fresh = offload.Site(offload.load_profiles().get("second"))
    try:
        status = fresh.job(job.id).status()
    finally:
        fresh.close()
    assert (status.state, status.exit_code) == (JobState.FAILED, 3), status


def test_the_same_job_id_on_both_clusters_is_two_jobs(testsite_config):
    """offload keys a job by (site, id). Both clusters count from 1, so the first, which has run many more jobs, has
    had a job with the id of this job of the second: to offload's API and records they are two jobs."""
    site = offload.load_site("second")
    job = site.submit(JobSpec(["echo", "on second"], name="second-same-id"))
    status = job.wait(timeout=120)
    assert status.state is JobState.COMPLETED and status.node in ("second1", "second2"), status
    known = subprocess.run(["sacct", "--noheader", "--allocations", "--parsable2", f"--jobs={job.id}",
                            "--format=JobID,NodeList"], capture_output=True, text=True, check=True).stdout  # fmt: skip
    if not known.strip():
        pytest.skip(f"the first cluster has not run a job {job.id} yet")
    theirs = offload.load_site("testsite").job(job.id)  # the first cluster's own job of that id (a test's, earlier)
    assert theirs.status().node not in ("second1", "second2"), theirs.status()
    again = site.job(job.id)  # reattached by (site, id): this job, not the first's
    assert again.status().state is JobState.COMPLETED and list(again.logs()) == ["on second"]
    records = JobRecords()
    mine = records.get("second", job.id)
    assert mine is not None and mine.command == ["echo", "on second"] and mine.jobdir == job.ref.jobdir
    assert mine.state == "COMPLETED"
    other = records.get("testsite", job.id)  # recorded when this machine submitted the first's job (in CI, often)
    if other is not None:
        assert other.jobdir != mine.jobdir and {"second", "testsite"} <= set(records.sites_of(job.id))
