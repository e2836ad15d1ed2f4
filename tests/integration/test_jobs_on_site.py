"""The core API on the test site: quoting, many jobs over one connection, bad input, reconnects."""

import json
import subprocess
import sys
import time
import uuid

import pytest

import offload
from offload import ConfigError, ImageError, JobSpec, JobState, Mount, Resources
from offload.submit import PARALLEL_SUBMISSIONS

from .conftest import STATE, queued_jobs, wait_for_state, wait_until

NASTY = ["a b", "$(touch /tmp/pwned)", "`touch /tmp/pwned`", "x; touch /tmp/pwned", "l1\nl2", "'\"", "$HOME", "*"]


def test_arguments_env_secrets_and_mount_paths_reach_the_payload_literally(any_site):
    site = any_site  # SLURM, then Grid Engine: quoting is the core's and the runtime's, whatever the scheduler
    # on the site's shared file system: jobs of one test may run on different hosts, each with its own /tmp
    weird_dir = f"{site.workdir()}/offload dir $(x) `y` ;z {uuid.uuid4().hex[:6]}"
    # on the host, outside any container (whose file system does not show the site's home): a directory, and in
    # it a file the payload will find through the mount
    made = site.submit(JobSpec(["sh", "-c", 'mkdir -p "$1" && echo mounted > "$1/probe"', "sh", weird_dir],
                               name="mkdir", container=False)).wait(timeout=60)  # fmt: skip
    assert made.state is JobState.COMPLETED, made
    code = (
        "import os, sys, json; print(json.dumps([sys.argv[1:], os.environ['PLAIN'], os.environ['TOKEN'],"
        " open('/work/probe').read().strip(), os.getcwd()]))"
    )
    secret = "tok 'en' $(touch /tmp/pwned) \n second line"
    spec = JobSpec(["python3", "-c", code, *NASTY], env={"PLAIN": NASTY[1] + NASTY[4]}, secrets={"TOKEN": secret},
                   mounts=[Mount(weird_dir, "/work")], workdir="/work")  # fmt: skip
    job = site.submit(spec)
    status = job.wait(timeout=60)
    log = list(job.logs())
    assert status.state is JobState.COMPLETED, log
    argv, plain, token, probe, cwd = json.loads("".join(log))
    assert argv == NASTY
    assert plain == NASTY[1] + NASTY[4]
    assert token == secret
    assert (probe, cwd) == ("mounted", "/work")
    check = site.submit(JobSpec(["sh", "-c", "test -e /tmp/pwned && echo PWNED || echo clean"]))
    check.wait(timeout=60)
    assert list(check.logs()) == ["clean"]
    body = offload_read(site, f"{job.ref.jobdir}/job.sh")
    assert "tok 'en'" not in body, "a secret reached the batch script"


def offload_read(site, path: str) -> str:
    from offload import _loop

    return _loop.run(site.transport.read_file(path)).decode()


def test_a_hundred_jobs_over_one_connection_with_one_squeue_per_poll(testsite_config):
    # A fresh Site, so its counters are this test's alone.
    from offload import load_profiles

    site = offload.Site(load_profiles().get("testsite"))
    try:
        specs = [JobSpec(["sh", "-c", f"echo {i}; exit $(( {i} % 3 ))"], name="hundred") for i in range(100)]
        started = time.monotonic()
        jobs = site.submit_many(specs)
        assert len({j.id for j in jobs}) == 100
        statuses = [j.wait(timeout=300) for j in jobs]
        elapsed = time.monotonic() - started
        assert [s.exit_code for s in statuses] == [i % 3 for i in range(100)]
        assert list(jobs[42].logs()) == ["42"]
        stats = site.transport.stats
        assert stats["connects"] == 1
        # all 100 submissions in one round trip, spread over a few channels that run at once
        assert stats["run:bash"] <= PARALLEL_SUBMISSIONS
        # one squeue per poll, whatever the number of jobs waited on (not one per job)
        assert stats["run:squeue"] == site._poller.polls
        assert site._poller.polls <= elapsed / site.config.poll_interval + 3
    finally:
        site.close()


def test_identical_specs_go_as_one_array(any_site):
    site = any_site
    jobs = site.submit_many([JobSpec(["sh", "-c", 'echo "task $OFFLOAD_TASK_INDEX"'])] * 5)
    assert len({j.ref.jobdir for j in jobs}) == 1 and [j.ref.index for j in jobs] == list(range(5))  # one array
    separator = "_" if site.config.scheduler == "slurm" else "."  # 12_0 on SLURM, 12.1 on Grid Engine (from 1)
    array_id = jobs[0].id.split(separator)[0]
    first = 0 if site.config.scheduler == "slurm" else 1
    assert [j.id for j in jobs] == [f"{array_id}{separator}{i + first}" for i in range(5)]
    for i, job in enumerate(jobs):
        assert job.wait(timeout=90).state is JobState.COMPLETED
        assert list(job.logs()) == [f"task {i}"]


def test_an_array_cancelled_before_any_task_ran_ends_every_task_also_once_slurmctld_forgot_it(site, site_user):
    """A held array cancelled whole is one accounting record under the array's id: each task is CANCELLED, to
    this client and to a fresh one after MinJobAge, never UNKNOWN and polled for an hour (CI of stop 32)."""
    name = f"heldarr-{uuid.uuid4().hex[:6]}"
    jobs = site.submit_many([JobSpec(["true"], name=name, resources=Resources(extra=("--hold",)))] * 3)
    site.cancel(jobs)
    assert {job.wait(timeout=60).state for job in jobs} == {JobState.CANCELLED}
    array = jobs[0].id.split("_")[0]
    deadline = time.monotonic() + 120  # until slurmctld forgets it (MinJobAge=30): then only accounting knows
    while subprocess.run(["squeue", "--noheader", f"--jobs={array}"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "slurmctld still lists the array"
        time.sleep(3)
    fresh = offload.Site(site.config)
    try:
        seen = [fresh.job(job.id, jobdir=job.ref.jobdir, index=job.ref.index).status() for job in jobs]
    finally:
        fresh.close()
    assert {status.state for status in seen} == {JobState.CANCELLED}, seen


def test_a_refused_job_carries_slurms_message_and_leaves_nothing(site, site_user):
    name = f"refused-{uuid.uuid4().hex[:6]}"
    bad = JobSpec(["true"], name=name, resources=Resources(partition="nosuchpartition"))
    good = JobSpec(["sleep", "60"], name=name)
    with pytest.raises(offload.SubmissionError) as err:
        site.submit_many([good, bad])
    assert "invalid partition" in err.value.scheduler_message.lower()
    assert "were cancelled" in str(err.value)  # the good one: all or nothing
    # squeue lists a cancelled job that had started (COMPLETING) until its node has cleaned up: a second or two, or
    # more on a loaded machine (a README run found it still there right after the error)
    wait_until(lambda: queued_jobs(site_user, name) == [], timeout=30, what="the cancelled job to leave the queue")


def test_bad_input_is_refused_before_submission(site, site_user):
    before = queued_jobs(site_user)
    with pytest.raises(ConfigError, match="--nodes 3"):
        site.submit(JobSpec(["true"], resources=Resources(gpus=5)))
    # Docker Hub, which the test site's login node cannot reach either: said before anything is queued
    with pytest.raises(ImageError, match="cannot reach the registry registry-1.docker.io.*offload image push"):
        site.submit(JobSpec(["true"], image="docker://python:3.11"))
    with pytest.raises(ConfigError, match="walltime"):
        site.submit(JobSpec(["true"], resources=Resources(walltime="soon")))
    assert queued_jobs(site_user) == before


def test_missing_image_is_a_clear_error(tmp_path, testsite_config):
    config = tmp_path / "sites.toml"
    text = testsite_config.read_text().replace('image = "', 'previous_image = "').replace("previous_image", "#")
    config.write_text(text)
    result = run_cli(["run", "--site", "testsite", "--", "true"], config)
    assert result.returncode == 2
    assert "no container image" in result.stderr and "--image" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_image_path_that_does_not_exist_is_found_before_the_queue(site, site_user):
    before = queued_jobs(site_user)
    with pytest.raises(offload.SubmissionError, match="does not exist on the site") as err:
        site.submit(JobSpec(["true"], image="/no/such/image", name="noimage"))
    assert "/no/such/image" in str(err.value)
    assert queued_jobs(site_user) == before


def test_an_image_missing_on_the_node_is_said_as_such(site):
    """The login node saw it, the node does not (a file system the nodes lack, or one removed meanwhile)."""
    import pathlib

    image = pathlib.Path(f"/home/{site.config.user}/vanishing-image")
    image.mkdir(exist_ok=True)
    job = site.submit(JobSpec(["true"], image=str(image), resources=Resources(extra=("--hold",)), name="vanish"))
    image.rmdir()
    subprocess.run(["scontrol", "release", job.id], check=True)
    status = job.wait(timeout=120)
    assert (status.state, status.exit_code) == (JobState.FAILED, 94)
    assert "cannot start the container: the image" in job.tail() and "is not on node" in job.tail()


def run_cli(args, config):
    import os

    env = {**os.environ, "OFFLOAD_CONFIG": str(config)}
    return subprocess.run([sys.executable, "-m", "offload.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda t: t.replace("port = 2222", "port = 2229"), "cannot reach"),
        (lambda t: t.replace("[sites.testsite]", "[sites.testsite]\nprt = 1"), "did you mean 'port'"),
        (lambda t: t + "\n[sites.broken\n", "not valid TOML"),
        (lambda t: t.replace("known_hosts = ", "known_hosts = '/dev/null' #"), "offload sites trust testsite"),
    ],
    ids=["unreachable-host", "unknown-key", "malformed-toml", "unknown-host-key"],
)
def test_site_problems_are_one_line_with_the_fix(tmp_path, testsite_config, change, expected, site_user):
    config = tmp_path / "sites.toml"
    config.write_text(change(testsite_config.read_text()))
    before = queued_jobs(site_user)
    result = run_cli(["run", "--site", "testsite", "--", "true"], config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert queued_jobs(site_user) == before


def test_unknown_site_and_negative_gpus_from_the_cli(testsite_config):
    result = run_cli(["run", "--site", "testsit", "--", "true"], testsite_config)
    assert result.returncode == 2 and "did you mean 'testsite'" in result.stderr
    result = run_cli(["run", "--site", "testsite", "--gpus", "-2", "--", "true"], testsite_config)
    assert result.returncode == 2 and "cannot be negative" in result.stderr


def test_trust_records_the_host_key_then_connections_work(tmp_path, testsite_config):
    known = tmp_path / "known_hosts"
    config = tmp_path / "sites.toml"
    config.write_text(testsite_config.read_text().replace(str(STATE / "known_hosts"), str(known)))
    refused = run_cli(["run", "--site", "testsite", "--", "true"], config)
    assert refused.returncode == 2 and "not trusted" in refused.stderr
    trusted = run_cli(["sites", "trust", "testsite", "--yes"], config)
    assert trusted.returncode == 0, trusted.stderr
    assert "SHA256:" in trusted.stdout and known.read_text().startswith("[127.0.0.1]:2222 ssh-ed25519 ")
    assert run_cli(["run", "--site", "testsite", "--", "true"], config).returncode == 0
    # a different key already on record is never silently added to: the user must say --replace
    known.write_text("[127.0.0.1]:2222 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOtherKeyOtherKeyOtherKeyOtherKeyOtherKe\n")
    changed = run_cli(["sites", "trust", "testsite", "--yes"], config)
    assert changed.returncode == 2 and "different key" in changed.stderr
    assert run_cli(["run", "--site", "testsite", "--", "true"], config).returncode == 2
    assert run_cli(["sites", "trust", "testsite", "--yes", "--replace"], config).returncode == 0
    assert len(known.read_text().splitlines()) == 1
    assert run_cli(["run", "--site", "testsite", "--", "true"], config).returncode == 0


def test_doctor_passes_on_the_test_site(testsite_config):
    result = run_cli(["doctor", "testsite"], testsite_config)
    assert result.returncode == 0, result.stdout
    for check in ("connection", "host key", "sbatch", "squeue", "scancel", "sacct", "runtime", "image", "workdir",
                  "partitions", "gpus", "node network"):  # fmt: skip
        assert any(line.startswith("PASS") and check in line for line in result.stdout.splitlines()), check
    assert "gpu: 2 node(s), GPUs" in result.stdout
    assert "no outbound network" in result.stdout  # the test site's nodes are fenced off, as real ones


def test_a_dropped_connection_is_reopened_and_waiting_carries_on(site):
    from offload import _loop

    job = site.submit(JobSpec(["sh", "-c", "sleep 3; echo survived"]))
    time.sleep(1)
    connects = site.transport.stats["connects"]
    _loop.run(_abort(site.transport))  # the network drops under us
    assert job.wait(timeout=60).state is JobState.COMPLETED
    assert list(job.logs()) == ["survived"]
    assert site.transport.stats["connects"] == connects + 1


async def _abort(transport):
    conn = await transport._connection()
    conn.abort()


def test_sleeping_job_shows_running_with_its_node(any_site):
    job = any_site.submit(JobSpec(["sleep", "30"]))
    status = wait_for_state(job, JobState.RUNNING, timeout=60)
    assert status.node in {node.name for node in any_site.nodes()}
    job.cancel()
    assert job.wait(timeout=30).state is JobState.CANCELLED


def test_a_site_can_name_an_alias_of_the_users_ssh_config(tmp_path, testsite_config):
    ssh_config = tmp_path / "ssh_config"
    ssh_config.write_text(
        f"Host hpc-alias\n  HostName 127.0.0.1\n  Port 2222\n  User hpcuser\n  IdentityFile {STATE / 'id_ed25519'}\n"
    )
    config = tmp_path / "sites.toml"
    config.write_text(
        "[sites.aliased]\nhost = 'hpc-alias'\nscheduler = 'slurm'\nruntime = 'none'\n"
        f"ssh_config = ['{ssh_config}']\nknown_hosts = '{STATE / 'known_hosts'}'\n"
    )
    result = run_cli(["run", "--site", "aliased", "--", "sh", "-c", "echo $SLURM_JOB_ID on $(whoami)"], config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("on hpcuser")


def test_a_directory_of_a_thousand_files_goes_in_the_one_round_trip(site, tmp_path):
    folder = tmp_path / "inputs"
    (folder / "nested").mkdir(parents=True)
    for i in range(1000):
        (folder / f"part-{i:04d}.txt").write_text(f"{i}\n")
    (folder / "nested" / "deep.txt").write_text("deep\n")
    fresh = offload.Site(site.config)
    try:
        fresh.submit(JobSpec(["true"]))  # connect and learn the workdir first
        before = fresh.transport.stats["run:bash"]
        job = fresh.submit(JobSpec(["sh", "-c", "ls inputs | wc -l; cat inputs/nested/deep.txt inputs/part-0999.txt"],
                                   files={"inputs/": offload.archive(folder)}))  # fmt: skip
        assert fresh.transport.stats["run:bash"] - before == 1  # one submission program, files and all
        assert job.wait(timeout=120).state is JobState.COMPLETED
        assert job.tail().split() == ["1001", "deep", "999"]
    finally:
        fresh.close()


def test_a_burst_beyond_sshds_max_sessions_waits_for_slots_and_keeps_the_connection(site):
    """The test site's sshd keeps OpenSSH's MaxSessions (10): 30 commands at once, beside the SFTP session, all
    answer (they queue for a slot of offload's budget), and the one shared connection survives them."""
    import asyncio

    from offload import _loop

    workdir = site.workdir()

    async def burst():
        transport = site.transport
        await transport.read_file(f"{workdir}/nothing-here")  # the SFTP session holds a channel too
        connection = transport._conn
        results = await asyncio.gather(*(transport.run(["sh", "-c", f"sleep 1; echo {i}"]) for i in range(30)))
        return [r.stdout.strip() for r in results], connection is transport._conn

    answers, same_connection = _loop.run(burst())
    assert answers == [str(i) for i in range(30)]
    assert same_connection
