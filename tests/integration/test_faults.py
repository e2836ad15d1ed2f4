"""What a real site does to a client, made on demand with the test site's fault switches: a hung squeue,
slurmdbd or slurmctld down, a node that fails. Nothing hangs, no state is guessed, and every fault is cleared
by the test that set it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import offload
from offload import JobSpec, JobState, SiteNotAnswering, SubmissionError

from .conftest import wait_for_state

TESTSITE = str(Path(__file__).parents[2] / "scripts" / "testsite")


@pytest.fixture
def fault():
    def switch(*args: str) -> None:
        subprocess.run([TESTSITE, "fault", *args], check=True, capture_output=True)

    yield switch
    subprocess.run([TESTSITE, "fault", "clear"], check=True, capture_output=True)


@pytest.fixture
def quick(site):
    """The test site with a short command timeout, so a hang costs seconds, not the default 45."""
    quick = offload.Site(site.config.with_overrides(command_timeout=8.0))
    yield quick
    quick.close()


def test_a_hung_squeue_gives_a_clear_error_then_the_right_state(quick, fault):
    job = quick.submit(JobSpec(["sh", "-c", "sleep 5; exit 3"], name="hung"))
    assert job.status().state in (JobState.PENDING, JobState.RUNNING)
    fault("squeue-slow", "600")
    with pytest.raises(SiteNotAnswering, match="not answering.*squeue.*command_timeout"):
        job.status()
    subprocess.run([TESTSITE, "fault", "clear"], check=True, capture_output=True)
    status = job.wait(timeout=180)  # the poller recovers by itself
    assert (status.state, status.exit_code) == (JobState.FAILED, 3)


def test_offload_status_under_a_hung_squeue_answers_with_the_fault(testsite_config, fault, tmp_path):
    config = tmp_path / "sites.toml"
    # in the testsite table itself (the profile file has more tables after it: the other sites, [groups])
    config.write_text(
        testsite_config.read_text().replace("[sites.testsite]\n", "[sites.testsite]\ncommand_timeout = 6\n")
    )
    env = {**os.environ, "OFFLOAD_CONFIG": str(config)}
    cli = [sys.executable, "-m", "offload.cli"]
    submitted = subprocess.run([*cli, "run", "--site", "testsite", "--detach", "--", "sleep", "60"], env=env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
    job_id = submitted.stdout.strip()
    fault("squeue-slow", "600")
    result = subprocess.run([*cli, "status", job_id], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "the site is not answering" in result.stderr
    subprocess.run([*cli, "cancel", job_id], env={**env, "OFFLOAD_CONFIG": str(testsite_config)},
                   capture_output=True, timeout=120)  # fmt: skip


def test_an_ended_job_is_unknown_while_accounting_is_down_then_final(site, fault):
    """A cancelled job leaves no exit code file; once slurmctld forgets it (MinJobAge=30), only accounting
    knows how it ended. While slurmdbd is down that is UNKNOWN, never FAILED; then CANCELLED."""
    job = site.submit(JobSpec(["sleep", "300"], name="acct"))
    wait_for_state(job, JobState.RUNNING, timeout=60)
    fault("slurmdbd-down")
    subprocess.run(["scancel", job.id], check=True)
    fresh = offload.Site(site.config)  # a process that did not see the end, e.g. a triggerer started later
    try:
        seen = fresh.job(job.id, jobdir=job.ref.jobdir)
        deadline = time.time() + 150
        while (state := seen.status().state) is not JobState.UNKNOWN:  # until slurmctld forgets the job
            assert state in (JobState.RUNNING, JobState.CANCELLED) and time.time() < deadline
            time.sleep(2)
            seen = offload.Site(site.config).job(job.id, jobdir=job.ref.jobdir)
        assert "no accounting record" in seen.status().reason
        subprocess.run([TESTSITE, "fault", "clear"], check=True, capture_output=True)
        assert seen.wait(timeout=180).state is JobState.CANCELLED
    finally:
        fresh.close()


def test_slurmctld_down_refuses_submissions_clearly_and_waits_resume(site, fault):
    job = site.submit(JobSpec(["sh", "-c", "sleep 20; echo done"], name="ctld"))
    fault("slurmctld-down")
    with pytest.raises(SubmissionError, match="refused the job"):
        site.submit(JobSpec(["true"], name="while-down"))
    subprocess.run([TESTSITE, "fault", "clear"], check=True, capture_output=True)
    status = job.wait(timeout=240)
    assert status.state is JobState.COMPLETED, status
    assert job.tail().strip() == "done"


def test_a_node_failure_fails_its_job_with_the_reason(site, fault):
    once = offload.Resources(partition="cpu", extra=("--no-requeue",))  # else SLURM runs it again elsewhere
    job = site.submit(JobSpec(["sleep", "300"], resources=once, name="nodefail"))
    status = wait_for_state(job, JobState.RUNNING, timeout=60)
    fault("node-down", status.node)
    final = job.wait(timeout=180)
    assert final.state is JobState.FAILED and "NODE_FAIL" in final.describe()
    assert final.cause is offload.EndCause.NODE_FAILURE


def test_a_forked_child_submits_and_waits(site):
    program = textwrap.dedent("""
        import os, sys
        import offload
        site = offload.load_site("testsite")
        site.submit(offload.JobSpec(["true"])).wait(timeout=60)  # the parent's loop and connection are live
        pid = os.fork()
        if pid == 0:
            job = site.submit(offload.JobSpec(["echo", "from the child"]))
            status = job.wait(timeout=30)
            print("child", status.state.value, job.tail().strip(), flush=True)
            sys.exit(0)
        _, code = os.waitpid(pid, 0)
        again = site.submit(offload.JobSpec(["true"])).wait(timeout=60)
        print("parent", os.waitstatus_to_exitcode(code), again.state.value)
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert "child COMPLETED from the child" in result.stdout, result.stderr
    assert "parent 0 COMPLETED" in result.stdout, result.stderr


def test_an_sbatch_wrapper_that_greets_first_does_not_turn_a_submission_into_a_refusal(site, site_user):
    """Sites wrap sbatch and print a banner or a quota warning before its answer (e.g. "Welcome to Leonardo"):
    the job is in, so offload must read its id past the banner, not report a refusal while the job runs.

    The wrapper goes first on the site user's PATH through a line at the top of ~/.bashrc (bash reads it for
    ssh commands, before Debian's early return for non-interactive shells), and greets only for this test's
    job name; every other sbatch call passes through untouched. Both are removed afterwards, as is the job."""
    name = f"banner-{uuid.uuid4().hex[:8]}"
    account = pwd.getpwnam(site_user)
    home = Path(account.pw_dir)
    wrappers = home / f".offload-test-{name}"
    calls = wrappers / "calls"
    bashrc = home / ".bashrc"
    original = bashrc.read_bytes() if bashrc.exists() else None
    try:
        wrappers.mkdir(mode=0o755)
        (wrappers / "sbatch").write_text(
            textwrap.dedent(f"""\
            #!/bin/sh
            # offload integration test {name}: a site's sbatch wrapper that greets first, for this job only
            script=$(cat)
            case "$script" in *"--job-name={name}"*)
                echo called >> {calls}
                echo "Welcome to Leonardo"
                echo
                echo "WARNING: 95% of your 100 GB home quota is used" ;;
            esac
            for real in /usr/local/bin/sbatch /usr/bin/sbatch; do
                if [ -x "$real" ]; then printf '%s\\n' "$script" | "$real" "$@"; exit $?; fi
            done
            echo "offload test wrapper: no sbatch found" >&2; exit 127
        """)
        )
        (wrappers / "sbatch").chmod(0o755)
        os.chown(wrappers, account.pw_uid, account.pw_gid)  # the site user writes the calls file
        line = f'export PATH="{wrappers}:$PATH"  # offload integration test {name}, removed by it\n'.encode()
        bashrc.write_bytes(line + (original or b""))
        if original is None:
            os.chown(bashrc, account.pw_uid, account.pw_gid)

        job = site.submit(JobSpec(["sh", "-c", "echo ran"], name=name))
        assert calls.exists(), (
            "the banner wrapper was not used: bash did not read ~/.bashrc for ssh commands, so this test tested nothing"
        )
        assert job.id.isdigit(), job.id
        assert "Welcome to Leonardo" in (Path(job.ref.jobdir) / "jobid").read_text()  # the banner was there
        status = job.wait(timeout=120)
        assert status.state is JobState.COMPLETED, status
        assert job.tail().strip() == "ran"
    finally:
        if original is None:
            bashrc.unlink(missing_ok=True)
        else:
            bashrc.write_bytes(original)  # the same file, owner and mode: only its bytes change back
        shutil.rmtree(wrappers, ignore_errors=True)
        subprocess.run(["scancel", f"--name={name}", f"--user={site_user}"], capture_output=True, timeout=60)
