"""The built-in local site end to end: real local processes, the same job layout as on a SLURM site."""

import shlex
import time
from pathlib import Path

import pytest

import offload
from offload import ConfigError, JobFailedError, JobSpec, JobState


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("")
    site = offload.load_site("local")
    yield site
    site.close()


NASTY = ["a b", "$(touch /tmp/offload-pwned)", "`id`", "x;y", "line1\nline2", "'\"", "$HOME", "*"]


def test_submit_wait_logs_and_exact_exit_code(site):
    job = site.submit(JobSpec(["sh", "-c", "echo out; echo err >&2; exit 7"], name="seven"))
    status = job.wait(timeout=30)
    assert (status.state, status.exit_code) == (JobState.FAILED, 7)
    assert sorted(job.logs()) == ["err", "out"]
    with pytest.raises(JobFailedError, match="exit code 7") as err:
        job.wait(check=True)
    assert "out" in err.value.log_tail


def test_arguments_env_and_secrets_reach_the_payload_literally(site, tmp_path):
    code = "import os,sys,json; print(json.dumps([sys.argv[1:], os.environ['E'], os.environ['S']]))"
    pwned = Path("/tmp/offload-pwned")
    pwned.unlink(missing_ok=True)
    secret = "s3cr3t-" + NASTY[1]
    job = site.submit(JobSpec(["python3", "-c", code, *NASTY], env={"E": NASTY[1]}, secrets={"S": secret}))
    assert job.wait(timeout=30).state is JobState.COMPLETED
    import json

    argv, env_value, seen_secret = json.loads("".join(job.logs()))
    assert argv == NASTY and env_value == NASTY[1] and seen_secret == secret
    assert not pwned.exists()
    script = (tmp_path / "work" / "jobs").glob("*/job.sh")
    assert all("s3cr3t" not in p.read_text() for p in script), "a secret was written into the batch script"


def test_the_job_removes_its_secrets_file_before_the_payload_runs(site, tmp_path):
    code = 'test -e "$OFFLOAD_JOB_DIR/secrets.env" && echo present || echo gone; stat -c %a "$OFFLOAD_JOB_DIR"; '
    code += "echo $TOKEN"
    job = site.submit(JobSpec(["sh", "-c", code], secrets={"TOKEN": "x"}))
    job.wait(timeout=30)
    assert list(job.logs()) == ["gone", "700", "x"]  # read, then removed: the value lives only in the job


def test_follow_streams_until_the_end(site):
    job = site.submit(JobSpec(["sh", "-c", "for i in 1 2 3; do echo $i; sleep 0.3; done"]))
    assert list(job.logs(follow=True)) == ["1", "2", "3"]
    assert job.state is JobState.COMPLETED


def test_a_file_the_job_writes_later_is_followed_once_it_runs(site):
    """What Jupyter and a Dask scheduler do: wait until the job runs, then for the address it writes."""
    code = 'sleep 0.5; echo "127.0.0.1:8786" > "$OFFLOAD_JOB_DIR/addr.tmp"; mv "$OFFLOAD_JOB_DIR/addr.tmp" ' \
           '"$OFFLOAD_JOB_DIR/addr"; sleep 1'  # fmt: skip
    job = site.submit(JobSpec(["sh", "-c", code]))
    told = []
    assert job.wait_for_state(JobState.RUNNING, timeout=30, on_change=told.append).state is JobState.RUNNING
    assert told[-1].state is JobState.RUNNING and len({s.describe() for s in told}) == len(told)
    assert next(job.follow("addr", interval=0.1)) == b"127.0.0.1:8786\n"
    assert b"".join(job.follow("addr", offset=10)) == b"8786\n"  # to the job's end, from an offset


def test_cancel_stops_the_whole_process_group(site, tmp_path):
    marker = tmp_path / "survived"
    job = site.submit(JobSpec(["sh", "-c", f"sleep 3; touch {shlex.quote(str(marker))}"]))
    time.sleep(0.5)
    job.cancel()
    assert job.wait(timeout=10).state is JobState.CANCELLED
    time.sleep(3.5)
    assert not marker.exists()


def test_submit_many_and_reattach_by_id(site):
    jobs = site.submit_many([JobSpec(["sh", "-c", f"exit {i}"]) for i in range(4)])
    assert [j.wait(timeout=30).exit_code for j in jobs] == [0, 1, 2, 3]
    again = site.job(jobs[2].id)
    assert again.ref.jobdir == jobs[2].ref.jobdir and again.exit_code == 2


def test_bad_input_is_refused_before_anything_runs(site, tmp_path):
    with pytest.raises(ConfigError, match="need a container runtime"):
        site.submit(JobSpec(["true"], mounts=["/data"]))
    assert not (tmp_path / "work").exists()


def test_unknown_job_id_is_a_clear_error(site):
    with pytest.raises(offload.JobNotFoundError, match="neither in the scheduler's queue"):
        site.job("999999999")


async def test_async_api_from_another_event_loop(site):
    job = await site.asubmit(JobSpec(["sh", "-c", "echo async"]))
    status = await job.finished(timeout=30)
    assert status.state is JobState.COMPLETED
    assert [line async for line in job.alogs()] == ["async"]


def test_a_reused_pid_is_not_taken_for_the_job(site):
    """After the job's process is gone, the system may give its pid to another: that one is neither shown as
    the job running nor killed by a cancel (offload checks the process's start time)."""
    import os
    import subprocess

    stranger = subprocess.Popen(["sleep", "30"])
    time.sleep(0.1)  # a real reuse comes long after: start times (in clock ticks) differ
    try:
        job = site.submit(JobSpec(["sleep", "30"], name="reused"))
        jobdir = Path(job.ref.jobdir)
        os.kill(int(job.id), 9)  # the job's own process dies without a word...
        deadline = time.time() + 10
        while job.status().state is JobState.RUNNING:
            assert time.time() < deadline
            time.sleep(0.1)
        # ...and its pid now "belongs" to the stranger: point the job's records at it
        reused = offload.Site(site.config).job(str(stranger.pid), jobdir=str(jobdir))
        assert reused.status().state is not JobState.RUNNING
        reused.cancel()
        assert stranger.poll() is None  # not killed
    finally:
        stranger.kill()


def test_a_process_that_is_no_job_of_this_machine_is_not_found_and_a_cancel_writes_nothing_at_the_root(site):
    """A local job is known by its directory, from this machine's records: a bare process id names none, even
    a live process's, and ``site.job`` says so. A ref without a directory (a failed submission's jobid file, read
    back) is cancelled by its pid alone: nothing is written beside an empty directory (as root: ``/cancelled``,
    which made every unknown id look cancelled on the machine where a run left it)."""
    import subprocess

    from offload import _loop
    from offload.jobs import JobRef

    stranger = subprocess.Popen(["sleep", "30"])
    existed = Path("/cancelled").exists()
    try:
        with pytest.raises(offload.JobNotFoundError, match="neither in the scheduler's queue"):
            site.job(str(stranger.pid))
        _loop.run(site.scheduler.cancel(site.transport, [JobRef(str(stranger.pid), "")]))
        assert stranger.wait(timeout=10) == -15  # SIGTERM: the pid of an undone submission is its job's
        assert Path("/cancelled").exists() == existed
    finally:
        stranger.kill()
        stranger.wait()


def test_local_records_are_private(site):
    records = site._records.path
    assert oct(records.stat().st_mode & 0o777) == "0o600"
    assert oct(records.parent.stat().st_mode & 0o777) == "0o700"


def test_tail_reads_only_the_end_of_a_big_log(site, monkeypatch):
    job = site.submit(JobSpec(["python3", "-c", "import sys\nfor i in range(400000): print('x' * 60, i)"]))
    job.wait(timeout=60)
    read = []
    original = site.transport.read_file

    async def spy(path, offset=0, size=None):
        data = await original(path, offset, size)
        read.append(len(data))
        return data

    monkeypatch.setattr(site.transport, "read_file", spy)
    assert job.tail(2).splitlines()[-1].endswith(" 399999")
    assert sum(read) < 1024 * 1024  # the log is 26 MB


def test_container_command_is_the_runtimes_line_checked_as_a_specs_container_is(tmp_path, monkeypatch):
    """For payloads that start containers themselves (JobSpec(container=False), an interLink pod's driver)."""
    config = tmp_path / "sites.toml"
    config.write_text(f'[sites.ch]\ntransport = "local"\nscheduler = "local"\nruntime = "charliecloud"\n'
                      f'workdir = "{tmp_path / "work"}"\n')  # fmt: skip
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    ch = offload.load_site("ch")
    try:
        run = ch.container_command(["python3", "app.py"], image="/images/x", env_names=["MODE"], workdir="/w")
        assert isinstance(run, offload.ContainerCommand)
        assert run.argv[0] == "ch-run" and run.argv[-2:] == ("python3", "app.py") and "/images/x" in run.argv
        with pytest.raises(ConfigError, match="read-only bind"):  # what the runtime cannot do, before any job
            ch.container_command(["true"], image="/images/x", mounts=[offload.Mount("/a", "/b", True)])
    finally:
        ch.close()
