"""User story 1 from the terminal: ``offload run`` on the test site."""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from .conftest import queued_jobs, wait_until

OFFLOAD = [sys.executable, "-m", "offload.cli"]
TESTSITE = str(Path(__file__).parents[2] / "scripts" / "testsite")


def offload(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*OFFLOAD, *args], capture_output=True, text=True, timeout=180, **kwargs)


def test_run_on_two_gpus_prints_their_ids():
    code = "import os;print(os.environ['CUDA_VISIBLE_DEVICES'])"
    result = offload("run", "--site", "testsite", "--gpus", "2", "--", "python3", "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0,1"
    assert "submitted job" in result.stderr


def test_exit_code_of_the_payload_is_the_exit_code_of_the_cli():
    result = offload("run", "--site", "testsite", "--", "python3", "-c", "import sys; print('bye'); sys.exit(3)")
    assert result.returncode == 3
    assert result.stdout.strip() == "bye"
    assert "exit code 3" in result.stderr


def test_ctrl_c_cancels_the_job(site_user):
    name = f"ctrlc-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [*OFFLOAD, "run", "--site", "testsite", "--name", name, "--", "sh", "-c", "echo started; sleep 120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "started"  # the job runs and its output streams
    assert queued_jobs(site_user, name)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "cancelled" in err
    assert queued_jobs(site_user, name) == []


def test_sigterm_cancels_the_job_too(site_user):
    name = f"term-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [*OFFLOAD, "run", "--site", "testsite", "--name", name, "--", "sh", "-c", "echo started; sleep 120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert queued_jobs(site_user, name) == []


def test_detach_then_status_logs_and_cancel(site_user):
    name = f"detach-{uuid.uuid4().hex[:8]}"
    result = offload("run", "--site", "testsite", "--detach", "--name", name, "--", "sh", "-c", "echo hi; sleep 120")
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    deadline = time.time() + 60
    while "RUNNING" not in (status := offload("status", job_id)).stdout:
        assert time.time() < deadline, status.stdout + status.stderr
        time.sleep(0.5)
    while offload("logs", job_id).stdout.strip() != "hi":
        assert time.time() < deadline
        time.sleep(0.5)
    listing = offload("status", "--site", "testsite", "--name", name)
    assert job_id in listing.stdout and "RUNNING" in listing.stdout
    cancelled = offload("cancel", "--name", name)
    assert cancelled.returncode == 0 and job_id in cancelled.stdout
    assert queued_jobs(site_user, name) == []
    assert "CANCELLED" in offload("status", job_id).stdout


def test_pending_jobs_show_slurms_reason(site_user):
    # Hold every GPU of the GPU partition (2 nodes x 2), then ask for one more GPU: SLURM says why it waits.
    hog = f"hog-{uuid.uuid4().hex[:8]}"
    held = offload("run", "--site", "testsite", "--detach", "--nodes", "2", "--gpus-per-node", "2", "--name", hog,
                   "--", "sleep", "120")  # fmt: skip
    assert held.returncode == 0, held.stderr
    try:
        proc = subprocess.Popen(
            [*OFFLOAD, "run", "--site", "testsite", "--gpus", "1", "--", "echo", "done"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
        )  # fmt: skip
        time.sleep(6)
        offload("cancel", "--name", hog)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert "PENDING (Resources)" in err or "PENDING (Priority)" in err
        assert out.strip() == "done"
    finally:
        offload("cancel", "--name", hog)


def test_an_interrupted_submission_leaves_no_job_behind(site_user):
    """Ctrl-C (or SIGTERM) while a slow sbatch runs: the CLI waits for the submission to end, then cancels the job
    that got in; it never exits first and lets the job land unrecorded (it did at 15 s)."""
    name = f"slowsub-{uuid.uuid4().hex[:8]}"
    subprocess.run([TESTSITE, "fault", "sbatch-slow", "25"], check=True, capture_output=True)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            proc = subprocess.Popen([*OFFLOAD, "run", "--site", "testsite", "--name", name, "--", "sleep", "300"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(4)  # connected, and sbatch is sleeping on the login node
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=150)
            assert proc.returncode == 128 + sig, err
            assert "interrupted during the submission" in err and "cancelling the 1 job(s)" in err, err
            assert queued_jobs(site_user, name) == [], err
    finally:
        subprocess.run([TESTSITE, "fault", "clear"], check=True, capture_output=True)


def test_a_client_killed_during_the_submission_leaves_no_job_behind(site_user):
    """SIGKILL while a slow sbatch runs: no client lives to cancel the job that gets in, so the submission
    program on the login node does, once it finds its channel gone (at its report after sbatch)."""
    name = f"killsub-{uuid.uuid4().hex[:8]}"
    subprocess.run([TESTSITE, "fault", "sbatch-slow", "10"], check=True, capture_output=True)
    try:
        proc = subprocess.Popen([*OFFLOAD, "run", "--site", "testsite", "--name", name, "--", "sleep", "300"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(5)  # connected, and sbatch is sleeping on the login node
        proc.kill()
        proc.communicate(timeout=30)
        # the job gets in once sbatch wakes; the program then cancels it: seen in the queue, then gone
        time.sleep(15)
        wait_until(lambda: queued_jobs(site_user, name) == [], timeout=60, what="the abandoned job to be cancelled")
        argv = ["sacct", "--noheader", "--parsable2", "--allocations", f"--user={site_user}", f"--name={name}",
                "--format=State"]  # fmt: skip
        states = wait_until(lambda: subprocess.run(argv, capture_output=True, text=True).stdout.strip(), timeout=60,
                            what="the job's accounting record")  # fmt: skip
        assert states.startswith("CANCELLED"), states  # it did get in, and was cancelled
    finally:
        subprocess.run([TESTSITE, "fault", "clear"], check=True, capture_output=True)
