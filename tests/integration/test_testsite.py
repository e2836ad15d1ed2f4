"""The first proof that the site is real: as the cluster user, over OpenSSH (not offload's code), an
``sbatch --gpus=2`` job runs ``ch-run <image> -- python3`` and reports two GPU ids and the container's OS."""

import shlex
import subprocess
import time
import urllib.request
from pathlib import Path

from .conftest import STATE


def ssh(*command: str) -> str:
    argv = ["ssh", "-p", "2222", "-i", str(STATE / "id_ed25519"), "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "hpcuser@127.0.0.1", *command]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout


def ssh_input(command: str, text: str) -> str:
    argv = ["ssh", "-p", "2222", "-i", str(STATE / "id_ed25519"), "-o", f"UserKnownHostsFile={STATE / 'known_hosts'}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "hpcuser@127.0.0.1", command]  # fmt: skip
    return subprocess.run(argv, input=text, capture_output=True, text=True, check=True, timeout=120).stdout


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


def test_the_site_is_a_cluster_with_accounting_and_real_limits():
    nodes = subprocess.run(["sinfo", "-N", "--noheader", "--format=%N %P"], capture_output=True, text=True,
                           check=True).stdout.split("\n")  # fmt: skip
    assert len({line.split()[0] for line in nodes if line.strip()}) >= 3
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    settings = dict(line.split("=", 1) for line in config.splitlines() if " = " in line)
    settings = {k.strip(): v.strip() for k, v in settings.items()}
    assert settings["MaxArraySize"] == "1001"
    assert settings["MinJobAge"].startswith("30")
    assert settings["AccountingStorageType"] == "accounting_storage/slurmdbd"
    qos = subprocess.run(["sacctmgr", "-nP", "show", "qos", "format=Name,MaxSubmitJobsPU"], capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert "limited|50" in qos


def test_compute_nodes_cannot_reach_services_on_this_machine():
    """As on most sites: a job can reach slurmctld, not sshd of the login node nor a service of the user's side."""
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        probe = ("import socket\n"
                 f"for host, port in (('10.231.77.1', 6817), ('10.231.77.1', 2222), ('10.231.77.1', {port}), "
                 f"('127.0.0.1', {port})):\n"
                 "    try:\n"
                 "        socket.create_connection((host, port), timeout=3).close(); print(host, port, 'open')\n"
                 "    except OSError:\n"
                 "        print(host, port, 'closed')\n")  # fmt: skip
        script = f"#!/bin/bash\n#SBATCH --output=isolation-%j.out\npython3 -c {shlex.quote(probe)}\n"
        job_id = ssh_input("cd ~ && sbatch --parsable --wait", script).strip()
        seen = ssh("cat", f"isolation-{job_id}.out").split("\n")
        assert "10.231.77.1 6817 open" in seen  # what Slurm itself needs
        assert "10.231.77.1 2222 closed" in seen  # the login node's sshd
        assert f"10.231.77.1 {port} closed" in seen and f"127.0.0.1 {port} closed" in seen  # the user's side
        # ...while this machine reaches the service, so "closed" is the network, not the service
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).close()
    finally:
        server.shutdown()


def test_fault_switches_go_on_and_off():
    testsite = str(Path(__file__).parents[2] / "scripts" / "testsite")
    try:
        subprocess.run([testsite, "fault", "squeue-slow", "8"], check=True, capture_output=True)
        assert "squeue-slow 8" in subprocess.run([testsite, "status"], capture_output=True, text=True).stdout
        start = time.monotonic()
        ssh("squeue", "--noheader", "--me")
        assert time.monotonic() - start >= 8  # the cluster user's squeue sleeps first...
        start = time.monotonic()
        subprocess.run(["squeue", "--noheader"], check=True, capture_output=True)
        assert time.monotonic() - start < 8  # ...root's (the tests' own checks) does not
        subprocess.run([testsite, "fault", "node-down", "node3"], check=True, capture_output=True)
        state = subprocess.run(["sinfo", "-h", "-n", "node3", "-o", "%t"], capture_output=True, text=True).stdout
        assert state.strip().startswith("down")
    finally:
        subprocess.run([testsite, "fault", "clear"], check=True, capture_output=True)
    assert "fault          none" in subprocess.run([testsite, "status"], capture_output=True, text=True).stdout
    state = subprocess.run(["sinfo", "-h", "-n", "node3", "-o", "%t"], capture_output=True, text=True).stdout
    assert state.strip() in ("idle", "mix", "alloc")
