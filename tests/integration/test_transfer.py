"""Files through the site's one SSH connection: large files in and out of a job's directory (API and CLI), and
a large transfer that leaves the rest of the connection (status polls) answering."""

import hashlib
import os
import subprocess
import sys
import threading
import time

import offload
from offload import _loop

from .conftest import wait_for_state

OFFLOAD = [sys.executable, "-m", "offload.cli"]


def digest(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path, mib: int):
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def test_large_files_in_and_out_of_a_jobs_directory(site, tmp_path):
    data = random_file(tmp_path / "weights.bin", 96)
    job = site.submit(offload.JobSpec(["sh", "-c", "while [ ! -e done ]; do sleep 0.2; done; sha256sum weights.bin "
                                       "> sum; cp weights.bin back.bin"]))  # fmt: skip
    seen: list[tuple[int, int]] = []
    job.upload(data, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (96 << 20, 96 << 20) and len(seen) > 2  # progress as it went, ending at the whole file
    job.put("done", b"")
    assert job.wait(timeout=120).exit_code == 0
    assert job.get("sum").decode().split()[0] == digest(data)
    job.download("back.bin", tmp_path / "back.bin")
    assert digest(tmp_path / "back.bin") == digest(data)
    # the CLI: put and get with progress on stderr (a line per tenth when it is no terminal)
    put = subprocess.run([*OFFLOAD, "put", job.id, str(data), "again.bin", "--site", "testsite"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert put.returncode == 0, put.stderr
    assert "weights.bin: 96 of 96 MiB" in put.stderr
    got = subprocess.run([*OFFLOAD, "get", job.id, "again.bin", str(tmp_path / "again.bin"), "--site", "testsite"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert digest(tmp_path / "again.bin") == digest(data)
    bad = subprocess.run([*OFFLOAD, "get", job.id, "../../etc/passwd", "--site", "testsite"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "not a plain file name" in bad.stderr


def test_a_large_transfer_leaves_status_polls_answering(site, tmp_path):
    """While 500 MiB go up the connection, a job's status is still asked and answered every second."""
    big = random_file(tmp_path / "big.bin", 500)
    job = site.submit(offload.JobSpec(["sleep", "300"]))
    wait_for_state(job, offload.JobState.RUNNING)
    remote = f"{site.workdir()}/transfer-test.bin"
    finished = threading.Event()
    errors: list[BaseException] = []

    def transfer() -> None:
        try:
            _loop.run(site.transport.put(str(big), remote))
        except BaseException as exc:
            errors.append(exc)
        finally:
            finished.set()

    thread = threading.Thread(target=transfer)
    started = time.monotonic()
    thread.start()
    answers: list[float] = []
    try:
        while not finished.is_set():
            asked = time.monotonic()
            status = _loop.run(site.job_host.status(job.ref, refresh=True))  # a fresh squeue, not a cached answer
            answers.append(time.monotonic() - asked)
            assert status.state == offload.JobState.RUNNING
            time.sleep(max(0.0, 1.0 - (time.monotonic() - asked)))
        took = time.monotonic() - started
        thread.join()
        assert not errors, errors
        assert site.transport_run(["stat", "-c", "%s", remote]).strip() == str(500 << 20)
        # every poll during the transfer answered; a starved connection would answer only once it is over
        assert len(answers) >= max(1, int(took) - 1), (answers, took)
        assert max(answers) < 5, f"a status poll waited {max(answers):.1f} s behind the transfer ({took:.1f} s)"
    finally:
        job.cancel()
        site.transport_run(["rm", "-f", remote])
