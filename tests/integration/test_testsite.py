"""The first proof that the site is real: as the cluster user, over OpenSSH (not offload's code), an
``sbatch --gpus=2`` job runs ``ch-run <image> -- python3`` and reports two GPU ids and the container's OS."""

import subprocess
import time

from .conftest import STATE


def ssh(*command: str) -> str:
    argv = ["ssh", "-p", "2222", "-i", str(STATE / "id_ed25519"), "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "hpcuser@127.0.0.1", *command]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def test_sbatch_gpus_in_a_charliecloud_container_over_ssh():
    payload = (
        "import os, platform; "
        "print(os.environ['CUDA_VISIBLE_DEVICES'], platform.freedesktop_os_release()['PRETTY_NAME'], os.getuid())"
    )
    script = f"""#!/bin/bash
#SBATCH --gpus=2
#SBATCH --partition=gpu
#SBATCH --output=testsite-proof-%j.out
ch-run {STATE}/images/default -- python3 -c "{payload}"
"""
    job_id = subprocess.run(
        ["ssh", "-p", "2222", "-i", str(STATE / "id_ed25519"), "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "hpcuser@127.0.0.1", "cd ~ && sbatch --parsable"],
        input=script, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    assert job_id.isdigit()
    for _ in range(120):
        state = ssh("squeue", "--noheader", "--states=all", f"--jobs={job_id}", "--format=%T").strip()
        if state in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    assert state == "COMPLETED"
    gpus, *os_name, uid = ssh("cat", f"testsite-proof-{job_id}.out").split()
    assert gpus == "0,1"
    assert " ".join(os_name) == "Debian GNU/Linux 12 (bookworm)"
    assert uid != "0"


def test_host_key_is_checked_against_the_generated_known_hosts():
    result = subprocess.run(
        ["ssh", "-p", "2222", "-i", str(STATE / "id_ed25519"), "-o", "UserKnownHostsFile=/dev/null",
         "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "hpcuser@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "Host key verification failed" in result.stderr


def test_password_login_is_refused():
    result = subprocess.run(
        ["ssh", "-p", "2222", "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}", "-o", "BatchMode=yes",
         "-o", "PubkeyAuthentication=no", "hpcuser@127.0.0.1", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "Permission denied" in result.stderr
