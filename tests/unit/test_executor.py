"""offload.Executor on the built-in local site: real jobs (local processes), real files, real cloudpickle."""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import offload
from offload import JobState, _loop
from offload import executor as executor_mod
from offload.executor import (
    Executor,
    Interpreter,
    JobDiedError,
    RemoteError,
    RemoteTraceback,
    VersionMismatchError,
)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD__LOCAL__WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "sites.toml"))
    (tmp_path / "sites.toml").write_text("")
    site = offload.load_site("local")
    yield site
    site.close()


@pytest.fixture
def make(site):
    """Executors on the local site; whatever a test leaves running is cancelled after it."""
    made: list[Executor] = []

    def new(**options) -> Executor:
        ex = Executor(site, **options)
        made.append(ex)
        return ex

    yield new
    for ex in made:
        ex.shutdown(wait=False, cancel_futures=True)
        jobs = [f.job for f in ex._not_done() if f._sent.done() and f.job is not None]
        if jobs:
            site.cancel(jobs)


def square(x):
    return x * x


def where(x):
    return x, int(os.environ.get("OFFLOAD_TASK_INDEX") or 0), os.getpid()


def sleepy(seconds, value=None):
    time.sleep(seconds)
    return value


def fails(x):
    def inner():
        raise ValueError(f"bad value {x}")

    inner()


def test_submit_returns_the_value_and_the_future_knows_its_job(make):
    ex = make()
    future = ex.submit(square, 12)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=60) == 144
    job = future.job
    assert isinstance(job, offload.Job) and job.status().state is JobState.COMPLETED
    plan = json.loads(job.get("executor.json"))
    assert plan["tasks"] == [[0]] and plan["python"] == list(sys.version_info[:2])
    assert job.name == "square"  # jobs carry the function's name (offload status --name square)


@pytest.fixture
def round_trips(site, monkeypatch):
    """The number of specs each submission round trip carried."""
    sent: list[int] = []
    real = site.asubmit_many

    async def counting(specs, **kwargs):
        sent.append(len(specs))
        return await real(specs, **kwargs)

    monkeypatch.setattr(site, "asubmit_many", counting)
    return sent


def test_submits_made_together_go_in_one_round_trip(make, round_trips):
    sent = round_trips
    ex = make()
    futures = [ex.submit(square, i) for i in range(6)]
    assert [f.result(timeout=60) for f in futures] == [i * i for i in range(6)]
    assert sent == [6]


def test_map_keeps_order_with_chunks_one_job_per_chunk(make, round_trips):
    sent = round_trips
    ex = make()
    assert list(ex.map(square, range(10), chunksize=3)) == [i * i for i in range(10)]
    assert sent == [4]  # 10 calls in chunks of 3: four jobs, one round trip
    assert list(ex.map(pow, [2, 3, 4], [5, 6, 7], timeout=60)) == [32, 729, 16384]


def test_map_as_an_array_each_task_runs_its_chunk(make, site):
    # The local scheduler has no arrays; here the executor plans for one as on SLURM (one spec, identical for
    # every task), and each job finds its chunk by $OFFLOAD_TASK_INDEX, as an array task does.
    ex = make()
    ex._arrays = True
    results = list(ex.map(where, range(7), chunksize=2))
    assert [x for x, _, _ in results] == list(range(7))
    assert [task for _, task, _ in results] == [0, 0, 1, 1, 2, 2, 3]
    assert len({pid for _, _, pid in results}) == 4  # one process per task, calls of a chunk in turn
    files = {p.name for p in Path(site.workdir(), "jobs").glob("where-*/*")}
    assert {"call.0.pkl", "call.3.pkl", "fn.pkl", "executor.json", "result.6.pkl"} <= files


def test_two_functions_of_one_name_never_share_an_array(make):
    # Each closure is above INLINE_FILE, so its code goes after the submission and the specs' inline files are
    # alike: only the plan keeps the two arrays apart.
    ex = make()
    ex._arrays = True
    first, second = b"a" * (2 << 20), b"b" * (2 << 20)
    f1 = lambda x: (first[:1], x)  # noqa: E731
    f2 = lambda x: (second[:1], x)  # noqa: E731
    futures = [ex.submit(f, x) for f in (f1, f2) for x in (0, 1)]
    assert [f.result(timeout=60) for f in futures] == [(b"a", 0), (b"a", 1), (b"b", 0), (b"b", 1)]


def test_a_remote_exception_is_reraised_with_its_remote_traceback(make):
    ex = make()
    future = ex.submit(fails, 7)
    with pytest.raises(ValueError, match="bad value 7") as caught:
        future.result(timeout=60)
    cause = caught.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in inner" in cause.text and "in fails" in cause.text and "ValueError: bad value 7" in cause.text
    assert any(future.job.id in note for note in caught.value.__notes__)
    assert "ValueError: bad value 7" in "\n".join(future.job.logs())  # and the job's log has it too
    assert future.job.status().state is JobState.FAILED


def test_map_raises_the_first_failing_call_when_its_turn_comes(make):
    ex = make()
    results = ex.map(lambda x: 1 // x, [1, 2, 0, 4])
    assert next(results) == 1
    assert next(results) == 0
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_an_exception_that_cannot_travel_back_is_a_remote_error_with_the_text(make):
    def unpicklable():
        import threading

        class Odd(Exception):
            def __init__(self):
                super().__init__("odd")
                self.lock = threading.Lock()

        raise Odd()

    with pytest.raises(RemoteError, match="odd") as caught:
        make().submit(unpicklable).result(timeout=60)
    assert "raise Odd()" in caught.value.remote_traceback or "Odd" in caught.value.remote_traceback


def test_a_killed_job_fails_its_future_with_the_reason(make):
    ex = make()
    future = ex.submit(sleepy, 60)
    deadline = time.monotonic() + 30
    while not future.running():
        assert time.monotonic() < deadline, "the call never ran"
        time.sleep(0.1)
    assert not future.cancel()  # running: as in concurrent.futures, a running call is not cancelled
    future.job.cancel()
    error = future.exception(timeout=60)
    assert isinstance(error, JobDiedError) and isinstance(error, offload.JobFailedError)
    assert error.status.state is JobState.CANCELLED and "CANCELLED" in str(error)
    assert error.job_id == future.job.id


def test_a_job_killed_by_a_signal_has_no_result_and_says_so(make):
    def die():
        os.kill(os.getpid(), 9)

    error = make().submit(die).exception(timeout=60)
    assert isinstance(error, JobDiedError) and error.status.state is JobState.FAILED
    assert "before its call returned" in str(error)


def test_large_arguments_and_results_go_by_file_not_in_the_submission(make, site):
    ex = make()
    data = os.urandom(3 << 20)  # above INLINE_FILE: written into the job directory after the submission
    future = ex.submit(lambda b: b * 8, data)
    result = future.result(timeout=120)
    assert result == data * 8  # 24 MiB back, read from result.0.pkl
    job = future.job
    plan = json.loads(job.get("executor.json"))
    assert plan["late"] == ["call.0.pkl"]
    assert job.get("inputs.ready") == b"" and len(job.get("call.0.pkl")) > len(data)
    assert Path(job.ref.jobdir, "job.sh").stat().st_size < 64 << 10


def test_shutdown_with_cancel_futures_cancels_what_is_queued(make, site, monkeypatch):
    monkeypatch.setattr(executor_mod, "LINGER", 5.0)  # the calls wait here, unsent, when shutdown comes
    before = len(site.records(limit=10_000))  # the records of this machine: earlier tests' jobs too
    ex = make()
    futures = [ex.submit(square, i) for i in range(3)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.cancelled() for f in futures)
    assert all(f.job is None for f in futures)
    assert len(site.records(limit=10_000)) == before  # nothing reached the site
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(square, 1)


def test_shutdown_waits_for_every_call(make):
    ex = make()
    futures = [ex.submit(sleepy, 0.5, i) for i in range(3)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [0, 1, 2]


def test_attach_by_job_id_from_a_new_executor(make, site):
    first = make()
    future = first.submit(sleepy, 1.0, {"answer": 42})
    job_id = future.job.id  # the client that submitted goes away here; the job and its result stay
    again = make().attach(job_id)
    assert again.result(timeout=60) == {"answer": 42}
    assert again.job.id == job_id


def test_attach_a_chunk_gives_the_list_of_its_results(make, site):
    ex = make(name="chunky")
    assert list(ex.map(square, range(5), chunksize=3)) == [0, 1, 4, 9, 16]
    found = make().attach_name("chunky")
    assert [f.result(timeout=60) for f in found] == [[0, 1, 4], [9, 16]]


def test_attach_refuses_a_job_that_is_not_a_call(site, make):
    job = site.submit(offload.JobSpec(["true"]))
    job.wait(timeout=30)
    with pytest.raises(offload.OffloadError, match="not a call of offload.Executor"):
        make().attach(job.id)


def test_the_version_check_refuses_another_python_before_anything_is_queued(make, site, monkeypatch):
    asked = []

    async def stub(site_, image):
        asked.append(image)
        return Interpreter((3, 9, 18), "CPython", "3.1.3", 5, "python3 in the image x on site 'local'")

    monkeypatch.setattr(executor_mod, "probe", stub)
    before = len(site.records(limit=10_000))
    ex = make()
    with pytest.raises(VersionMismatchError, match=r"is CPython 3\.9\.18; this client is CPython 3\.11") as caught:
        ex.submit(square, 2)
    assert "same Python minor version" in str(caught.value)
    with pytest.raises(VersionMismatchError):
        list(make().map(square, [1, 2]))
    assert len(site.records(limit=10_000)) == before  # nothing was queued
    assert len(asked) == 1  # one question per site and image in a process


def test_an_image_without_cloudpickle_gets_it_shipped(make, monkeypatch):
    async def stub(site_, image):
        return Interpreter(tuple(sys.version_info[:3]), "CPython", None, 5, "stub")

    monkeypatch.setattr(executor_mod, "probe", stub)

    def which_cloudpickle():
        return sys.modules["cloudpickle"].__file__

    future = make().submit(which_cloudpickle)
    assert "cloudpickle.zip" in future.result(timeout=60)  # the runner imported the staged copy
    assert future.job.get("cloudpickle.zip")[:2] == b"PK"


def test_the_probe_asks_the_interpreter_with_one_command(site, monkeypatch):
    monkeypatch.setattr(executor_mod, "_is_local", lambda s: False)  # as for a site of another machine
    monkeypatch.setattr(type(site), "python", property(lambda self: "python3"))
    found = _loop.run(executor_mod.probe(site, None))  # on offload's loop, where the site's transport lives
    assert found.version[0] == 3 and found.protocol >= 4 and "login node" in found.where


def test_compatible_accepts_a_patch_difference_only():
    here = Interpreter.here()
    executor_mod.compatible(Interpreter((*here.version[:2], 99), here.implementation, None, 5, "x"), here)
    with pytest.raises(VersionMismatchError, match="PyPy"):
        executor_mod.compatible(Interpreter(here.version, "PyPy", None, 5, "x"), here)


def test_a_function_of_a_local_module_travels_by_value(make, tmp_path, monkeypatch):
    (tmp_path / "mylocalmod_xyz.py").write_text(
        textwrap.dedent("""
        class Point:
            def __init__(self, x):
                self.x = x

        def shift(p):
            return Point(p.x + 1)
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import mylocalmod_xyz

    # the job does not see tmp_path on its sys.path: only by value can it run shift and make Points
    result = make().submit(mylocalmod_xyz.shift, mylocalmod_xyz.Point(1)).result(timeout=60)
    assert isinstance(result, mylocalmod_xyz.Point) and result.x == 2  # the class is the same one here


def test_a_module_the_site_lacks_is_a_clear_error(make, tmp_path, monkeypatch):
    (tmp_path / "notonsite_xyz.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import notonsite_xyz

    monkeypatch.setattr(executor_mod, "_is_users", lambda name: False)  # as if it were installed here
    with pytest.raises(RemoteError, match="could not be loaded") as caught:
        make().submit(notonsite_xyz.f).result(timeout=60)
    assert "notonsite_xyz" in str(caught.value) and "pickle_by_value" in str(caught.value)


def test_a_function_of_main_travels_by_value(tmp_path, site):
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent("""
        import offload

        def triple(x):
            return 3 * x

        with offload.Executor("local") as ex:
            print(list(ex.map(triple, [1, 2, 3])))
        """)
    )
    env = {**os.environ}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[3, 6, 9]"


def test_the_remote_decorator(site):
    @offload.remote(site=site, cpus=1)
    def add(a, b=0):
        return a + b

    try:
        future = add(1, b=2)
        assert isinstance(future, offload.JobFuture) and future.result(timeout=60) == 3
        assert list(add.map([1, 2], [10, 20])) == [11, 22]
        assert add.local(2, 3) == 5
        assert add.executor.resources.cpus == 1
    finally:
        add.executor.shutdown(wait=False, cancel_futures=True)


async def test_async_submit_map_and_awaiting_a_future(make):
    ex = make()
    future = await ex.asubmit(square, 9)
    assert (await future.ajob()).id == future.job.id
    assert await future == 81
    assert [r async for r in ex.amap(square, range(4))] == [0, 1, 4, 9]
    await ex.ashutdown()


def test_callbacks_may_use_the_sync_api(make):
    ex = make()
    seen = concurrent.futures.Future()
    future = ex.submit(square, 3)
    future.add_done_callback(lambda f: seen.set_result(f.job.status().state))
    assert future.result(timeout=60) == 9
    assert seen.result(timeout=30) is JobState.COMPLETED


def test_cleanup_removes_the_job_directory_once_results_are_read(make):
    ex = make(cleanup=True)
    future = ex.submit(square, 5)
    assert future.result(timeout=60) == 25
    jobdir = Path(future.job.ref.jobdir)
    deadline = time.monotonic() + 10
    while jobdir.exists():
        assert time.monotonic() < deadline, f"{jobdir} was not removed"
        time.sleep(0.1)


def test_bad_options_fail_when_the_executor_is_made(site):
    with pytest.raises(offload.ConfigError):
        Executor(site, env={"1BAD": "x"})
    with pytest.raises(offload.ConfigError):
        Executor(site, gpus=-1)
