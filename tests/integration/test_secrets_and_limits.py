"""Secrets that never outlive their job, and the limits of a real site: a full disk, a QOS's MaxSubmitJobs,
MaxArraySize, an interrupted submission. Nothing may be left behind: no secret on disk, no orphaned job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import offload
from offload import EndCause, JobSpec, JobState, Resources, SubmissionError

from .conftest import queued_jobs, wait_until

OFFLOAD = [sys.executable, "-m", "offload.cli"]
TESTSITE = str(Path(__file__).parents[2] / "scripts" / "testsite")
HELD = Resources(extra=("--hold",))


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fault(*args: str) -> None:
    subprocess.run([TESTSITE, "fault", *args], check=True, capture_output=True)


def files_holding(root: str, value: str) -> list[str]:
    """Files under ``root`` (read as root, on the site's file system) whose bytes contain ``value``."""
    found = subprocess.run(["grep", "-rl", "--", value, root], capture_output=True, text=True)
    return found.stdout.split()


def secrets_files(jobdir: str) -> list[str]:
    return sorted(p.name for p in Path(jobdir).glob("secrets.env*"))


def test_a_detached_jobs_secret_is_gone_from_the_site_when_it_ends(testsite_config, site_user):
    value = f"s3cr3t-{uuid.uuid4().hex}"
    name = unique("detached")
    argv = [*OFFLOAD, "run", "--site", "testsite", "--detach", "--name", name, "--secret", "API_KEY", "--",
            "sh", "-c", 'test -n "$API_KEY" && echo has-the-key']  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "API_KEY": value})
    assert result.returncode == 0, result.stderr
    wait_until(lambda: queued_jobs(site_user, name) == [], what="the job to end")
    # No offload process is running any more: the job itself removed what it was given.
    home = Path(f"/home/{site_user}/offload")
    assert files_holding(str(home), value) == []
    assert "has-the-key" in subprocess.run([*OFFLOAD, "logs", result.stdout.strip()], capture_output=True,
                                           text=True, timeout=60).stdout  # fmt: skip


def test_every_array_task_reads_its_own_copy(any_site):
    site = any_site
    spec = JobSpec(["sh", "-c", 'echo "task $OFFLOAD_TASK_INDEX has $TOKEN"'], secrets={"TOKEN": "t0k"}, name="arr")
    jobs = site.submit_many([spec] * 3)
    assert len({job.ref.jobdir for job in jobs}) == 1  # one array
    for job in jobs:
        assert job.wait(timeout=120).state is JobState.COMPLETED
    assert sorted(job.tail().strip() for job in jobs) == [f"task {i} has t0k" for i in range(3)]
    assert secrets_files(jobs[0].ref.jobdir) == []


def test_secrets_of_a_job_that_never_started_are_removed(site, site_user):
    job = site.submit(JobSpec(["true"], secrets={"TOKEN": "x"}, resources=HELD, name=unique("held")))
    jobdir = Path(job.ref.jobdir)
    assert oct((jobdir / "secrets.env").stat().st_mode & 0o777) == "0o600"
    assert oct(jobdir.stat().st_mode & 0o777) == "0o700"
    site.cancel([job])  # the client that sees it end removes the file (the job never ran to do it)
    wait_until(lambda: secrets_files(str(jobdir)) == [], timeout=30, what="the client to remove the secrets")

    # With no client watching, the next submission to the site sweeps what a cancelled job left.
    other = offload.Site(site.config)
    try:
        job = other.submit(JobSpec(["true"], secrets={"TOKEN": "y"}, resources=HELD, name=unique("orphan")))
    finally:
        other.close()
    subprocess.run(["scancel", job.id], check=True)
    wait_until(lambda: queued_jobs(site_user) == [] or job.id not in queued_jobs(site_user), what="the cancel")
    old = time.time() - 600
    os.utime(Path(job.ref.jobdir) / "secrets.env", (old, old))
    site.submit(JobSpec(["true"], name="sweeper"))
    wait_until(lambda: secrets_files(job.ref.jobdir) == [], timeout=30, what="the sweep")


def test_an_incomplete_secrets_file_stops_the_job_before_the_payload(site):
    job = site.submit(JobSpec(["sh", "-c", "touch ran"], secrets={"TOKEN": "value"}, resources=HELD, name="cut"))
    path = Path(job.ref.jobdir) / "secrets.env"
    path.write_text(path.read_text().splitlines()[0][:10])  # what a full disk leaves of a write
    subprocess.run(["scontrol", "release", job.id], check=True)
    status = job.wait(timeout=120)
    assert status.state is JobState.FAILED and status.exit_code == 95
    assert "incomplete" in job.tail()
    assert not (Path(job.ref.jobdir) / "ran").exists()


def test_a_full_disk_fails_the_submission_naming_the_file(site, site_user):
    fault("disk-full")
    try:
        full = offload.Site(site.config.with_overrides(workdir="~/offload-full"))
        before = queued_jobs(site_user)
        with pytest.raises(SubmissionError) as err:
            full.submit(JobSpec(["true"], secrets={"TOKEN": "x" * 4096}, files={"data.bin": b"x" * 65536}))
        message = str(err.value)
        assert "could not write" in message and "offload-full/jobs/" in message
        assert "No space left on device" in message and "full or over its quota" in message
        assert queued_jobs(site_user) == before  # nothing reached the queue
        full.close()
    finally:
        fault("clear")


def test_a_qos_limit_refuses_the_batch_and_leaves_nothing(site, site_user):
    name = unique("qos")
    limited = offload.Site(site.config.with_overrides(qos="limited"))
    try:
        specs = [JobSpec(["true", str(i)], resources=HELD, name=name) for i in range(60)]  # the QOS allows 50
        with pytest.raises(SubmissionError) as err:
            limited.submit_many(specs)
        assert "MaxSubmitJobs" in str(err.value) and "Nothing was left queued" in str(err.value)
        assert queued_jobs(site_user, name) == []
        # the default QOS has no such limit
        jobs = site.submit_many(specs)
        assert len(jobs) == 60
        site.cancel(jobs)
    finally:
        limited.close()
    assert queued_jobs(site_user, name) == []


def test_more_identical_jobs_than_max_array_size_go_as_several_arrays(site, site_user):
    name = unique("big")
    jobs = site.submit_many([JobSpec(["true"], resources=HELD, name=name)] * 1500)
    try:
        arrays = {job.id.split("_")[0] for job in jobs}
        assert len(arrays) == 2  # MaxArraySize=1001 on the test site: 1000 tasks (0..999) and 500
        assert len({job.id for job in jobs}) == 1500
        scripts = sorted({Path(job.ref.jobdir, "job.sh").read_text() for job in jobs}, key=len)
        assert any("+ 1000" in script for script in scripts)  # the second array continues the task indices
    finally:
        subprocess.run(["scancel", f"--name={name}"], check=True)
    wait_until(lambda: queued_jobs(site_user, name) == [], what="the cancel")


def test_an_interrupted_submission_leaves_no_job(testsite_config, site_user):
    name = unique("interrupted")
    program = textwrap.dedent(f"""
        import offload
        site = offload.load_site("testsite")
        print("submitting", flush=True)
        site.submit_many([offload.JobSpec(["sleep", "600", str(i)], name={name!r}) for i in range(3)])
        print("submitted", flush=True)
    """)
    fault("sbatch-slow", "3")
    try:
        proc = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        assert proc.stdout.readline().strip() == "submitting"
        time.sleep(4)  # the first sbatch went through; the others are on their way
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        assert "submitted" not in out
    finally:
        fault("clear")
    wait_until(lambda: queued_jobs(site_user, name) == [], timeout=60, what="the jobs that got in to be cancelled")


def test_a_job_over_its_memory_is_killed_and_reported_out_of_memory(site):
    """The test site enforces memory as a site does (jobacct_gather/linux with OverMemoryKill): a payload that
    takes 300 MiB under a 100 MiB request is killed, and the status says why, in its container or not."""
    grow = "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(30)"
    small = Resources(memory="100M")
    jobs = [
        site.submit(JobSpec(["python3", "-c", grow], resources=small, container=c, name=unique("oom")))
        for c in (True, False)
    ]
    fits = site.submit(
        JobSpec(["python3", "-c", grow.replace("300", "50")], resources=Resources(memory="200M"), name=unique("fits"))
    )
    for job in jobs:
        status = job.wait(timeout=180)
        assert status.state is JobState.FAILED and status.cause is EndCause.OUT_OF_MEMORY, status.describe()
        assert status.reason.startswith("OUT_OF_MEMORY")
        assert "of the 100 MiB" in status.reason
    assert fits.wait(timeout=180).state is JobState.COMPLETED
