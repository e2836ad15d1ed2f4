"""offload.Executor on the test site: Python functions as SLURM jobs in the site's Charliecloud image, over SSH.

Functions here are defined in this test module, which the site cannot import: they travel by value. Every test
cancels what it started (the leftovers guard fails a test that leaves a job)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

import offload
from offload import EndCause, JobState
from offload.executor import Executor, JobDiedError, RemoteTraceback

from .conftest import STATE, queued_jobs, wait_until


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def executor(site, **options):
    """An Executor whose jobs are all cancelled when the test ends, however it ends."""
    ex = Executor(site, **options)
    try:
        yield ex
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
        jobs = {f.job for f in ex._not_done() if f._sent.done() and f.job is not None}
        if jobs:
            site.cancel(list(jobs))


def host_and_task(x):
    return x * x, socket.gethostname(), os.environ.get("OFFLOAD_TASK_INDEX", "")


def test_map_is_one_job_array_and_keeps_order(any_site):
    site = any_site  # SLURM, then Grid Engine: the executor is a service over the public Site
    name = unique("exmap")
    with executor(site, name=name, walltime="00:05:00") as ex:
        started = time.monotonic()
        results = list(ex.map(host_and_task, range(20), chunksize=4, timeout=300))
        elapsed = time.monotonic() - started
    assert [r[0] for r in results] == [x * x for x in range(20)]
    assert [r[2] for r in results] == [str(i // 4) for i in range(20)]  # 5 tasks of 4 calls, in order
    assert {r[1] for r in results} <= {node.name for node in site.nodes()}
    records = site.records(name=name)
    assert len(records) == 5 and len({r.jobdir for r in records}) == 1, records  # one array, one directory
    assert sorted(r.task_index for r in records) == [0, 1, 2, 3, 4]
    print(f"20 calls as one array of 5 tasks: {elapsed:.1f} s")


def test_submits_made_together_are_one_array(site):
    name = unique("exsub")
    with executor(site, name=name) as ex:
        futures = [ex.submit(host_and_task, i) for i in range(6)]
        assert [f.result(timeout=300)[0] for f in futures] == [i * i for i in range(6)]
        ids = [f.job.id for f in futures]
    assert len({i.split("_")[0] for i in ids}) == 1 and all("_" in i for i in ids), ids


def raises_deep(key):
    def lookup(table):
        return table[key]

    return lookup({"present": 1})


def test_a_remote_exception_comes_back_with_its_remote_traceback(site):
    with executor(site, name=unique("exerr")) as ex:
        future = ex.submit(raises_deep, "missing-key")
        with pytest.raises(KeyError, match="missing-key") as caught:
            future.result(timeout=300)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback), caught.value
    assert "in lookup" in cause.text and "in raises_deep" in cause.text and "KeyError: 'missing-key'" in cause.text
    assert any(future.job.id in note for note in caught.value.__notes__)
    assert "KeyError" in future.job.tail()  # the job's own log says it too
    assert future.job.status().state is JobState.FAILED


def grow(megabytes):
    block = bytearray(megabytes << 20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page: the memory is really used
    time.sleep(30)
    return len(block)


def test_a_job_killed_for_its_memory_fails_its_future_with_the_cause(site):
    with executor(site, name=unique("exoom"), memory="100M") as ex:
        error = ex.submit(grow, 300).exception(timeout=300)
    assert isinstance(error, JobDiedError), error
    assert error.cause is EndCause.OUT_OF_MEMORY and error.status.state is JobState.FAILED, error.status
    assert "OUT_OF_MEMORY" in str(error)


def test_a_cancelled_job_fails_its_future_and_a_queued_call_can_be_cancelled(site, site_user):
    name = unique("excan")
    with executor(site, name=name) as ex:
        running = ex.submit(time.sleep, 120)
        wait_until(running.running, timeout=120, what="the call to run")
        running.job.cancel()
        error = running.exception(timeout=120)
        assert isinstance(error, JobDiedError) and error.status.state is JobState.CANCELLED, error
    # a call whose job waits in the queue (held) is cancelled with its future, and leaves the queue
    with executor(site, name=name, resources=offload.Resources(extra=("--hold",))) as held:
        queued = held.submit(time.sleep, 1)
        wait_until(lambda: queued.job is not None and queued_jobs(site_user, name), timeout=60, what="the job")
        assert queued.cancel() and queued.cancelled()
        wait_until(lambda: queued_jobs(site_user, name) == [], timeout=60, what="the held job to be cancelled")


def test_shutdown_cancel_futures_empties_the_queue(site, site_user):
    name = unique("exshut")
    with executor(site, name=name, resources=offload.Resources(extra=("--hold",))) as ex:
        futures = [ex.submit(time.sleep, 1) for _ in range(5)]  # one held array of five tasks
        assert "_" in futures[0].job.id
        wait_until(lambda: len(queued_jobs(site_user, name)) == 5, timeout=60, what="five queued tasks")
        ex.shutdown(wait=True, cancel_futures=True)
        assert all(f.cancelled() for f in futures)
        wait_until(lambda: queued_jobs(site_user, name) == [], timeout=60, what="the array to leave the queue")


def big(size, seed):
    import random

    data = random.Random(seed).randbytes(size)
    return data, hashlib.sha256(data).hexdigest()


def digest(data):
    return len(data), hashlib.sha256(data).hexdigest()


def test_large_results_and_arguments_travel_by_file(site):
    with executor(site, name=unique("exbig")) as ex:
        started = time.monotonic()
        data, said = ex.submit(big, 50 << 20, 7).result(timeout=300)
        fetched = time.monotonic() - started
        assert len(data) == 50 << 20 and hashlib.sha256(data).hexdigest() == said
        sent = os.urandom(20 << 20)  # above 1 MiB: written into the job's directory after the submission
        future = ex.submit(digest, sent)
        assert future.result(timeout=300) == (len(sent), hashlib.sha256(sent).hexdigest())
        assert b'"late": ["call.0.pkl"]' in future.job.get("executor.json")
        assert len(future.job.get("call.0.pkl")) > len(sent)  # there, in its own file
    print(f"a 50 MiB result in {fetched:.1f} s, submission included")


KILLED_CLIENT = """
import sys, time
import offload
ex = offload.Executor("testsite", name=sys.argv[1])
def slow():
    time.sleep(10)
    return "survived its client"
future = ex.submit(slow)
print(future.job.id, future.job.ref.jobdir, flush=True)
time.sleep(600)
"""


def test_attach_gets_the_result_of_a_killed_client(site, site_user, tmp_path):
    name = unique("exattach")
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_CLIENT), name], stdout=subprocess.PIPE,
                            stderr=(tmp_path / "client.err").open("w"), text=True)  # fmt: skip
    job_id = None
    try:
        line = proc.stdout.readline().split()
        assert line, (tmp_path / "client.err").read_text()[-3000:]
        job_id, jobdir = line
        proc.send_signal(signal.SIGKILL)  # no handler runs: the job stays, nobody watches it
        proc.wait(timeout=30)
        ex = Executor(site)
        future = ex.attach(job_id)  # this machine's records know the job
        assert future.result(timeout=300) == "survived its client"
        assert future.job.status().state is JobState.COMPLETED
        again = Executor(site).attach(job_id, jobdir=jobdir)  # as from another machine: the directory is enough
        assert again.result(timeout=60) == "survived its client"
    finally:
        proc.kill()
        if job_id and queued_jobs(site_user, name):
            site.cancel([site.job(job_id)])


def sees_gpus():
    return socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_a_gpu_call_sees_its_gpu(site):
    @offload.remote(site=site, gpus=1, name=unique("exgpu"))
    def on_gpu():
        return sees_gpus()

    try:
        host, devices = on_gpu().result(timeout=300)
        assert host in ("node1", "node2") and devices in ("0", "1"), (host, devices)
    finally:
        on_gpu.executor.shutdown(wait=False, cancel_futures=True)


def which_cloudpickle():
    import cloudpickle

    return cloudpickle.__file__, cloudpickle.__version__


def test_an_image_without_cloudpickle_gets_it_shipped(site):
    bare = str(STATE / "images" / "bare")  # Debian and its python3, nothing else
    with executor(site, image=bare, name=unique("exbare")) as ex:
        found = ex.check()
        assert found.cloudpickle is None and found.version[:2] == sys.version_info[:2], found
        where, version = ex.submit(which_cloudpickle).result(timeout=300)
    import cloudpickle

    assert "cloudpickle.zip" in where and version == cloudpickle.__version__


def test_the_version_check_is_one_command_per_image(site):
    ex = Executor(site)
    found = ex.check()
    assert found.version[:2] == sys.version_info[:2] and found.cloudpickle, found
    assert "in the image" in found.where
    started = time.monotonic()
    Executor(site).check()  # cached for this process: no command
    assert time.monotonic() - started < 0.5
