"""The runtime contract (offload/runtimes/base.py), run for real on Charliecloud, under SLURM and under Grid
Engine (``any_site``: what a scheduler plugin does, the container must see alike). Apptainer and Podman, which
have no package here, are held to the same contract by the command lines checked in tests/unit."""

import json
import uuid

import pytest

import offload
from offload import JobSpec, JobState, Mount, Resources

PROBE = (
    "import os, sys, json; print(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), "
    "'env': {k: os.environ.get(k) for k in ('MODE', 'TOKEN', 'CUDA_VISIBLE_DEVICES', 'SLURM_JOB_ID', 'JOB_ID', "
    "'OFFLOAD_JOB_DIR')}, 'os': open('/etc/os-release').read().split('\\n')[0], "
    "'jobdir_visible': os.path.exists(os.path.join(os.environ['OFFLOAD_JOB_DIR'], 'job.sh'))}))"
)


@pytest.fixture
def site(any_site):
    return any_site


def run(site, spec):
    job = site.submit(spec)
    status = job.wait(timeout=90)
    return job, status, list(job.logs())


def test_payload_runs_in_the_image_with_argv_env_gpus_and_workdir(site):
    spec = JobSpec(["python3", "-c", PROBE, "one", "two words"], env={"MODE": "fast"}, secrets={"TOKEN": "t0k"},
                   resources=Resources(gpus=2), mounts=[Mount("/tmp", "/scratch")], workdir="/scratch")  # fmt: skip
    job, status, log = run(site, spec)
    assert status.state is JobState.COMPLETED, log
    seen = json.loads(log[-1])
    assert seen["argv"] == ["one", "two words"]
    assert seen["cwd"] == "/scratch"
    assert seen["env"]["MODE"] == "fast" and seen["env"]["TOKEN"] == "t0k"
    if site.config.scheduler == "slurm":
        assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert seen["env"]["SLURM_JOB_ID"] == job.id
    else:  # Grid Engine sets no CUDA_VISIBLE_DEVICES (a site's prolog may); its job's id is JOB_ID
        assert seen["env"]["JOB_ID"] == job.id.split(".")[0]
    assert seen["jobdir_visible"]  # $OFFLOAD_JOB_DIR is the job's directory, seen from inside
    assert seen["os"] == 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"'


@pytest.mark.parametrize("code", [0, 1, 42, 255])
def test_exit_status_of_the_payload_is_the_jobs(site, code):
    _, status, _ = run(site, JobSpec(["python3", "-c", f"raise SystemExit({code})"]))
    assert status.exit_code == code
    assert status.state is (JobState.COMPLETED if code == 0 else JobState.FAILED)


def test_mounted_directory_is_writable_from_the_container(site):
    """A directory of the site's shared file system (a node's /tmp is its own on Grid Engine's hosts, as on real
    clusters), written from the container and read back by a job on whichever node, outside any container."""
    shared = f"{site.workdir()}/contract-{uuid.uuid4().hex[:8]}"
    site.transport_run(["mkdir", "-p", shared])
    try:
        _, _, log = run(site, JobSpec(["sh", "-c", "echo written > /scratch/offload-contract && echo ok"],
                                      mounts=[Mount(shared, "/scratch")]))  # fmt: skip
        assert log == ["ok"]
        check = site.submit(JobSpec(["cat", f"{shared}/offload-contract"], container=False))
        check.wait(timeout=60)
        assert list(check.logs()) == ["written"]
    finally:
        site.transport_run(["rm", "-rf", shared])


def test_a_missing_command_in_the_image_fails_with_the_reason_in_the_log(site):
    _, status, log = run(site, JobSpec(["no-such-program"]))
    assert status.state is JobState.FAILED and status.exit_code != 0
    assert any("no-such-program" in line for line in log)


def test_the_job_directory_is_shared_with_the_container(site):
    job = site.submit(
        JobSpec(["sh", "-c", 'cat "$OFFLOAD_JOB_DIR/input"; echo done > "$OFFLOAD_JOB_DIR/result"; sleep 1'])
    )
    job.put("input", b"staged before the job started\n")
    assert job.wait(timeout=60).state is JobState.COMPLETED
    assert list(job.logs()) == ["staged before the job started"]
    assert job.get("result") == b"done\n"
    with pytest.raises(offload.ConfigError, match="plain file name"):
        job.get("../secrets.env")
