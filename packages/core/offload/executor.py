"""Python functions as jobs: :class:`Executor`, a :class:`concurrent.futures.Executor` whose calls run on a site.

    with offload.Executor(site="leonardo", gpus=1, image="docker://me/analysis:1") as ex:
        future = ex.submit(score, 3)          # a job on the site; future.job is it (id, logs, status)
        print(future.result())                # its return value, or its exception with the remote traceback
        print(list(ex.map(score, range(100), chunksize=10)))   # ONE job array of 10 tasks, results in order

A service over the public facade (:class:`~offload.Site`, :class:`~offload.JobSpec`, :class:`~offload.Job`): each
call is a payload ``python3 -c RUNNER`` in the site's image, and everything it needs travels as files of its job
directory. Nothing is installed on the site:

* the function and each call's arguments travel pickled with cloudpickle, by value for the user's own modules
  (``__main__`` and every loaded module outside site-packages and the standard library), which the site cannot
  import; results and exceptions come back the same way, as ``result.<n>.pkl``, written whole by the job (a
  temporary file renamed), and read once the job (or its array task) is final;
* the image's interpreter is asked, once per site and image in a process, for its Python and cloudpickle
  versions before anything is queued (one short command on the login node, through the site's runtime:
  ``ch-run IMAGE -- python3 -c ...``; on the local site, this very interpreter). A function pickled by value is
  a code object, which loads only under the same Python minor version: another one is refused with what to
  do. An image without this client's cloudpickle gets it staged with the job (its own pure-Python source, a
  zip on the runner's ``sys.path``);
* calls queued together go in one round trip, and calls of one function as one job array (``map``: one task
  per chunk of ``chunksize`` calls), so a hundred calls cost one ``sbatch`` and one ``squeue`` per poll;
* small inputs ride in the submission itself; large ones (above 1 MiB) are written into the job's directory
  right after it and the job waits for them; large results are read back the same way, never through a
  batch script;
* a job that dies (OUT_OF_MEMORY, TIMEOUT, NODE_FAIL, cancelled) fails its futures with :class:`JobDiedError`,
  which names the state, its cause and the log's last lines;
* the futures survive the client: results stay in the job directory, and :meth:`Executor.attach` (by job id)
  or :meth:`Executor.attach_name` (by job name) gets them from another process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import io
import itertools
import json
import logging
import os
import pickle
import posixpath
import re
import secrets as _secrets
import shlex
import sys
import sysconfig
import threading
import time
import weakref
import zipfile
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cloudpickle

from offload import _loop
from offload.errors import ConfigError, JobFailedError, OffloadError, TransportError
from offload.jobs import EndCause, Job, JobState, JobStatus
from offload.placement import choose_site
from offload.retry import RetryPolicy
from offload.site import Site
from offload.spec import JobSpec, Mount, Resources

log = logging.getLogger("offload.executor")

INLINE_FILE = 1 << 20  # bytes: a pickled input up to this size rides in the submission itself
INLINE_BATCH = 8 << 20  # bytes of inputs one submission carries at most (JobSpec.files holds 16 MiB a spec)
LATE_PATIENCE = 1800  # seconds a job waits for late inputs that stopped growing, then fails its calls
RESULT_GRACE = 30.0  # seconds a result of a job that ended by itself may take to appear (slow shared file systems)
LINGER = 0.02  # seconds submit() waits for more calls to send in the same round trip
DEFAULT_ARRAY = 1000  # tasks per array where the scheduler names no limit
READY = "inputs.ready"  # the mark the client writes once the late inputs of a job directory are there
PLAN = "executor.json"
OWN_PACKAGES = frozenset({"offload", "dask_offload", "airflow_offload", "jupyterhub_offload", "interlink_offload"})
_READS = RetryPolicy(first=1.0, factor=2.0, cap=15.0, within=300.0)  # reading a result through a dropped link

# The program every call runs as, in the image's python3: the standard library and cloudpickle only (a copy
# staged with the job when the image has none, or another version). Python 3.6 syntax, so an old image still
# runs it far enough to say what is wrong.
RUNNER = r"""
import json, os, pickle, sys, time, traceback
d = os.environ["OFFLOAD_JOB_DIR"]
with open(os.path.join(d, "executor.json")) as f:
    plan = json.load(f)
tasks = plan["tasks"]
task = int(os.environ.get("OFFLOAD_TASK_INDEX") or 0) if len(tasks) > 1 else 0
calls = tasks[task]
protocol = min(plan["protocol"], pickle.HIGHEST_PROTOCOL)
here = "%d.%d.%d" % sys.version_info[:3]
there = "%d.%d" % tuple(plan["python"])


def put(number, data):
    path = os.path.join(d, "result.%d.pkl" % number)
    with open(path + ".tmp", "wb") as f:
        f.write(data)
    os.replace(path + ".tmp", path)


def failed(message):
    return pickle.dumps(("failed", message), protocol)


def stop(message):
    sys.stderr.write("offload: " + message + "\n")
    for number in calls:
        put(number, failed(message))
    sys.exit(2)


late = set(plan.get("late", ())) & {"fn.pkl", "call.%d.pkl" % task}
if late:
    # Large inputs come after the submission: wait for the client's mark, while what it sends keeps growing.
    size, since, pause = -1, time.time(), 0.05
    while not os.path.exists(os.path.join(d, "inputs.ready")):
        now = sum(os.path.getsize(os.path.join(d, n)) for n in late if os.path.exists(os.path.join(d, n)))
        if now != size:
            size, since = now, time.time()
        elif time.time() - since > plan["patience"]:
            stop("the client stopped sending this job's inputs (%s) %d s ago: was it killed?"
                 % (", ".join(sorted(late)), plan["patience"]))
        time.sleep(pause)
        pause = min(1.0, pause * 2)
shipped = os.path.join(d, "cloudpickle.zip")
if os.path.exists(shipped):
    sys.path.insert(0, shipped)
try:
    import cloudpickle
except Exception as exc:
    stop("cloudpickle cannot be imported by %s (Python %s): %r" % (sys.executable, here, exc))
try:
    with open(os.path.join(d, "fn.pkl"), "rb") as f:
        fn = pickle.load(f)
    with open(os.path.join(d, "call.%d.pkl" % task), "rb") as f:
        batch = pickle.load(f)
except Exception:
    why = traceback.format_exc()
    if here.rsplit(".", 1)[0] != there:
        why += ("It was pickled under Python %s and this image runs %s: code travels by value only between equal "
                "minor versions." % (there, here))
    else:
        why += ("A module it needs by reference is not importable in the image: install it there, or ship it by "
                "value (Executor(pickle_by_value=[...])).")
    stop("the function could not be loaded by %s (Python %s) on %s:\n%s" % (sys.executable, here,
         os.uname()[1], why))
errors = 0
for number, blob in batch:
    try:
        args, kwargs = pickle.loads(blob)
    except Exception:
        put(number, failed("the arguments could not be loaded on the site:\n" + traceback.format_exc()))
        errors += 1
        continue
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:
        text = traceback.format_exc()
        sys.stderr.write(text)
        try:
            raised = cloudpickle.dumps(exc, protocol)
        except Exception:
            raised = None
        kind = type(exc).__module__ + "." + type(exc).__qualname__
        put(number, pickle.dumps(("raised", raised, text, kind, str(exc)), protocol))
        errors += 1
        continue
    finally:
        args = kwargs = None
    try:
        data = cloudpickle.dumps(("ok", value), protocol)
    except Exception:
        data = failed("the function returned a %s, which cannot be pickled:\n%s"
                      % (type(value).__name__, traceback.format_exc()))
        errors += 1
    value = None
    put(number, data)
    data = None
sys.exit(1 if errors else 0)
"""

# What the image's interpreter says of itself: one line, read by the client.
PROBE = (
    "import json, pickle, platform, sys\n"
    "try:\n    import cloudpickle; cp = cloudpickle.__version__\nexcept Exception:\n    cp = None\n"
    "print('OFFLOAD_PROBE ' + json.dumps({'python': list(sys.version_info[:3]), 'implementation': "
    "platform.python_implementation(), 'cloudpickle': cp, 'protocol': pickle.HIGHEST_PROTOCOL}))\n"
)
PROBE_MARK = "OFFLOAD_PROBE "


# -- errors ---------------------------------------------------------------------------------------------------


class VersionMismatchError(ConfigError):
    """The image's Python cannot load what this client pickles (another minor version or implementation).
    Raised before anything is queued."""


class RemoteError(OffloadError):
    """A call failed on the site in a way that has no exception of its own here: its exception could not be
    sent back (or loaded here), or offload's runner could not run it. ``remote_traceback`` is the site's."""

    def __init__(self, message: str, *, type_name: str = "", remote_traceback: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class JobDiedError(JobFailedError):
    """The job of a call ended before the call returned: killed for its memory, its walltime, a lost node, or
    cancelled. ``status`` is the job's final status, ``cause`` why it ended beyond its state (None if the site
    did not say)."""

    def __init__(self, message: str, *, status: JobStatus, job_id: str, log_tail: str) -> None:
        super().__init__(message, job_id=job_id, state=status.state.value, exit_code=status.exit_code,
                         log_tail=log_tail)  # fmt: skip
        self.status = status
        self.cause: EndCause | None = status.cause


class RemoteTraceback(Exception):
    """The traceback of an exception raised on the site: the ``__cause__`` of the exception re-raised here, so
    Python prints it above the local one (as :mod:`concurrent.futures.process` does)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text.rstrip()}\n"""'


# -- the image's interpreter ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interpreter:
    """What runs the calls on the site: the image's ``python3`` (or this one, on the local site)."""

    version: tuple[int, int, int]
    implementation: str
    cloudpickle: str | None  # its own cloudpickle's version; None: it has none
    protocol: int  # its highest pickle protocol
    where: str  # for messages: "python3 in /images/x on site 'leonardo'"

    @classmethod
    def here(cls, where: str = "this interpreter") -> Interpreter:
        import platform

        return cls(tuple(sys.version_info[:3]), platform.python_implementation(), cloudpickle.__version__,
                   pickle.HIGHEST_PROTOCOL, where)  # type: ignore[arg-type]  # fmt: skip

    @property
    def minor(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))


def compatible(remote: Interpreter, local: Interpreter | None = None) -> None:
    """Raise :class:`VersionMismatchError` unless ``remote`` loads what this interpreter pickles by value."""
    local = local or Interpreter.here()
    if remote.implementation != local.implementation or remote.version[:2] != local.version[:2]:
        raise VersionMismatchError(
            f"{remote.where} is {remote.implementation} {remote.version_text}; this client is "
            f"{local.implementation} {local.version_text}. Functions and classes travel by value as code objects, "
            f"which load only under the same Python minor version: use an image with {local.implementation} "
            f"{local.minor} (e.g. docker://python:{local.minor}-slim), or run this client under Python "
            f"{remote.minor}. (Executor(check_versions=False) skips this check; the job then says what failed.)"
        )


def _is_local(site: Site) -> bool:
    return site.python == sys.executable and not site.runtime.runs_containers


async def probe(site: Site, image: str | None) -> Interpreter:
    """Ask the interpreter that will run the calls for its versions: this one on the local site (no command);
    elsewhere one short command on the login node, through the site's runtime (``ch-run``/``apptainer exec``
    IMAGE ``python3 -c ...``) after the profile's setup lines, as a job's script runs it. A site without
    containers answers with the login node's ``python3``, which stands in for the nodes'."""
    if _is_local(site):
        return Interpreter.here(f"{sys.executable} (the local site)")
    argv = [site.python, "-c", PROBE]
    prelude: list[str] = []
    where = f"{site.python} on the login node of site '{site.name}'"
    if site.runtime.runs_containers:
        resolved = await site.images.aresolve(image) if image else image
        command = site.container_command(argv, image=resolved or "")
        prelude, argv = list(command.prelude), list(command.argv)
        where = f"{site.python} in the image {image} on site '{site.name}'"
    shell = shlex.split(site.config.shebang[2:]) or ["/bin/bash"]
    script = "\n".join([*site.config.setup, *prelude, shlex.join(argv)])
    result = await site.transport.run([*shell, "-c", script], check=False, timeout=120)
    for line in result.stdout.splitlines():
        if line.startswith(PROBE_MARK):
            found = json.loads(line[len(PROBE_MARK) :])
            return Interpreter(tuple(found["python"]), found["implementation"], found["cloudpickle"],
                               int(found["protocol"]), where)  # type: ignore[arg-type]  # fmt: skip
    said = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:]) or "(no output)"
    raise OffloadError(
        f"could not ask {where} for its Python version (exit status {result.exit_status}):\n{said}\nThe image "
        "needs python3 at this client's version. If the login node cannot run the image, pass "
        "Executor(check_versions=False): the job then checks for itself."
    )


_interpreters: weakref.WeakKeyDictionary[Site, dict[str, Interpreter]] = weakref.WeakKeyDictionary()
_asking: dict[tuple[int, str], asyncio.Future[Interpreter]] = {}


async def interpreter(site: Site, image: str | None) -> Interpreter:
    """:func:`probe`, once per site and image in this process (concurrent askers share one command)."""
    known = _interpreters.setdefault(site, {})
    key = image or ""
    if key in known:
        return known[key]
    running = _asking.get((id(site), key))
    if running is None:
        running = _asking[(id(site), key)] = asyncio.ensure_future(probe(site, image))
        running.add_done_callback(lambda _: _asking.pop((id(site), key), None))
    found = await asyncio.shield(running)
    known[key] = found
    return found


_loop.at_fork(_asking.clear)

# -- cloudpickle, shipped ---------------------------------------------------------------------------------------


@functools.cache
def cloudpickle_zip() -> bytes:
    """This client's cloudpickle as a zip the runner puts first on ``sys.path`` (it is pure Python), with its
    licence. Built the same way every time, so specs that carry it stay equal (one job array)."""
    root = Path(cloudpickle.__file__).parent
    members = {f"cloudpickle/{p.relative_to(root).as_posix()}": p.read_bytes() for p in sorted(root.rglob("*.py"))}
    with contextlib.suppress(Exception):
        from importlib import metadata

        for entry in metadata.distribution("cloudpickle").files or []:
            if "licen" in entry.name.lower():
                members[f"cloudpickle/{entry.name}"] = Path(str(entry.locate())).read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(members.items()):
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buffer.getvalue()


# -- what travels by value --------------------------------------------------------------------------------------


@functools.cache
def _installed_roots() -> tuple[str, ...]:
    import site as site_module

    roots: set[str] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths = sysconfig.get_paths(vars={"base": prefix, "platbase": prefix, "installed_base": prefix,
                                          "installed_platbase": prefix})  # fmt: skip
        roots.update(paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths)
    with contextlib.suppress(Exception):
        roots.update(site_module.getsitepackages())
    with contextlib.suppress(Exception):
        roots.add(site_module.getusersitepackages())
    return tuple(sorted({os.path.realpath(r) for r in roots if r}))


_where_cache: dict[str, bool] = {}


def _is_users(name: str) -> bool:
    """Whether the top-level module ``name`` is the user's own: loaded from a file outside site-packages and
    the standard library (a script's folder, a checkout), so a site cannot import it."""
    known = _where_cache.get(name)
    if known is not None:
        return known
    module = sys.modules.get(name)
    paths = []
    if module is not None:
        file = getattr(module, "__file__", None)
        paths = [file] if file else list(getattr(module, "__path__", None) or [])
    mine = False
    if paths and name not in OWN_PACKAGES and not name.startswith("__"):
        real = os.path.realpath(paths[0])
        parts = Path(real).parts
        installed = "site-packages" in parts or "dist-packages" in parts
        installed = installed or any(real == root or real.startswith(root + os.sep) for root in _installed_roots())
        mine = not installed
    _where_cache[name] = mine
    return mine


_pickling = threading.Lock()


@contextlib.contextmanager
def by_value(extra: Iterable[str] = ()) -> Iterator[None]:
    """While it lasts, cloudpickle ships the user's own modules (and ``extra`` ones) by value: registered for
    the pickling done inside, and unregistered after, so other users of cloudpickle in this process (Dask)
    are not changed. ``__main__`` goes by value anyway."""
    with _pickling:
        registered = set(cloudpickle.list_registry_pickle_by_value())
        tops = {name.partition(".")[0] for name in list(sys.modules)}
        wanted = {name for name in tops if _is_users(name)} | set(extra)
        added = []
        for name in sorted(wanted - registered):
            module = sys.modules.get(name)
            if module is None:
                continue
            with contextlib.suppress(ValueError):
                cloudpickle.register_pickle_by_value(module)
                added.append(module)
        try:
            yield
        finally:
            for module in added:
                with contextlib.suppress(ValueError):
                    cloudpickle.unregister_pickle_by_value(module)


# -- futures ----------------------------------------------------------------------------------------------------


class JobFuture(concurrent.futures.Future):
    """The future of one call: a :class:`concurrent.futures.Future` (``result``, ``exception``, callbacks,
    ``concurrent.futures.wait``/``as_completed``) that knows its job, and may be awaited from asyncio.

    It stays pending while its job queues (``cancel()`` then removes the job from the queue, once no other
    call of the same array task still wants it) and is running while its job runs."""

    def __init__(self, executor: Executor | None = None) -> None:
        super().__init__()
        self._executor = executor
        self._task: _Task | None = None
        self._sent: concurrent.futures.Future[Job | None] = concurrent.futures.Future()

    @property
    def job(self) -> Job | None:
        """The job that runs this call (an array task for ``map``), once it is submitted (this waits for the
        submission, at most a round trip); None for a call cancelled before it was sent, or whose submission
        failed (then :meth:`exception` says why)."""
        if _loop.on_private_loop() and not self._sent.done():
            return None
        return self._sent.result()

    async def ajob(self) -> Job | None:
        """The async form of :attr:`job`."""
        return await asyncio.wrap_future(self._sent)

    def cancel(self) -> bool:
        """Cancel the call unless it runs or ran already. Its job leaves the site's queue (unless other calls of
        its array task still want it)."""
        if not super().cancel():
            return False
        if self._executor is not None:
            self._executor._cancelled(self)
        return True

    def __await__(self):
        return asyncio.wrap_future(self).__await__()

    def _running(self) -> None:
        with contextlib.suppress(RuntimeError, concurrent.futures.InvalidStateError):
            if not self.done():
                self.set_running_or_notify_cancel()

    def _set(self, value: Any = None, error: BaseException | None = None) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            if error is not None:
                self.set_exception(error)
            else:
                self.set_result(value)

    def __repr__(self) -> str:
        job = self._sent.result() if self._sent.done() else None
        return super().__repr__()[:-1] + (f" job={job.id}>" if job else ">")


@dataclass(eq=False)
class _Call:
    future: JobFuture
    blob: bytes  # (args, kwargs), pickled


@dataclass(eq=False)
class _Work:
    """Calls of one function waiting to be sent, in tasks (one per array task)."""

    fn: bytes
    name: str
    tasks: list[list[_Call]]


@dataclass(eq=False)
class _Dir:
    """One job directory: the tasks that share it, for cleanup once every result in it was read."""

    jobdir: str
    left: int


@dataclass(eq=False)
class _Task:
    """One job (or array task) and the calls it runs, by their number in its directory."""

    job: Job
    numbers: list[int]
    futures: list[JobFuture]
    folder: _Dir
    gather: bool = False  # attached: one future for all the calls of the task (a list when there are several)


# -- the executor ---------------------------------------------------------------------------------------------


def _resources(resources: Resources | None, **shorthand: Any) -> Resources:
    given = {k: v for k, v in shorthand.items() if v is not None}
    if resources is None:
        return Resources(**given)
    if not isinstance(resources, Resources):
        raise ConfigError("resources must be an offload.Resources(...)")
    return dataclasses.replace(resources, **given) if given else resources


def _job_name(fn: Callable[..., Any]) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", getattr(fn, "__name__", "") or "call").strip("._-")
    return (name or "call")[:64]


class Executor(concurrent.futures.Executor):
    """Run Python callables as jobs on ``site`` (a name, a :class:`Site`, or None: the default site; several,
    ``"a,b"`` or ``"@group"``: the one where a call's job starts first, chosen once, for every call).

    ``resources`` (or the shorthands ``gpus``, ``cpus``, ``memory``, ``walltime``, ``partition``) is what each
    job asks for; ``image``, ``env``, ``secrets``, ``reach`` and ``mounts`` mean what they mean for a
    :class:`JobSpec`. ``name`` names the jobs (default: the function's name), for ``offload status --name`` and
    :meth:`attach_name`. ``pickle_by_value`` names modules to ship by value beyond the automatic ones.
    ``check_versions=False`` skips the image's version check (and always ships cloudpickle). ``cleanup=True``
    removes a job's directory once every result in it was read (they stay there otherwise, for
    :meth:`attach`, next to the job's log).

    ``submit`` returns at once; calls submitted within a few milliseconds go to the site in one round trip.
    ``map`` sends its calls as one job array at once and yields results in order. ``shutdown(wait=True)`` (also
    the end of a ``with`` block) waits for every call; ``cancel_futures=True`` first cancels the calls whose
    jobs have not started (they leave the queue). Jobs that run on after this process ends keep their results
    on the site: :meth:`attach` gets them.
    """

    def __init__(
        self,
        site: str | Sequence[str] | Site | None = None,
        *,
        resources: Resources | None = None,
        gpus: int | None = None,
        cpus: int | None = None,
        memory: str | int | None = None,
        walltime: str | int | None = None,
        partition: str | None = None,
        image: str | None = None,
        env: Mapping[str, str] | None = None,
        secrets: Mapping[str, str] | None = None,
        reach: Mapping[str, str] | None = None,
        mounts: Sequence[Mount | str] = (),
        name: str | None = None,
        pickle_by_value: Iterable[str | Any] = (),
        check_versions: bool = True,
        cleanup: bool = False,
    ) -> None:
        self.resources = _resources(resources, gpus=gpus, cpus=cpus, memory=memory, walltime=walltime,
                                    partition=partition)  # fmt: skip
        # of several sites ("a,b", "@group"), the one where a call's job starts first: every call goes there
        self.site = choose_site(site, JobSpec(["python3"], image=image, resources=self.resources))
        self.image = image or self.site.config.image
        self.name = name
        self.check_versions = check_versions
        self.cleanup = cleanup
        self._by_value = tuple(m if isinstance(m, str) else m.__name__ for m in pickle_by_value)
        # one spec checked now: a bad resource, env name or image fails here, not at the first call
        self._template = JobSpec([self.site.python, "-c", RUNNER], image=image, resources=self.resources,
                                 env=dict(env or {}), secrets=dict(secrets or {}), reach=dict(reach or {}),
                                 mounts=tuple(mounts), name=name)  # fmt: skip
        self.site.validate(self._template)
        self._arrays = self.site.scheduler.supports_arrays
        self._lock = threading.Lock()
        self._pending: list[_Work] = []
        self._flush_due = False
        self._shut = False
        self._futures: set[JobFuture] = set()
        self._watchers: set[asyncio.Task[None]] = set()
        self._to_cancel: list[Job] = []
        self._holding = False  # shutdown(cancel_futures=True) gathers the jobs to cancel into one call
        self._interpreter: Interpreter | None = None
        self._sending: tuple[asyncio.AbstractEventLoop, asyncio.Lock] | None = None

    def __repr__(self) -> str:
        return f"<offload.Executor on {self.site.name}: {len(self._futures)} call(s) not done>"

    # -- the version check ----------------------------------------------------------------------------------

    @_loop.on_loop
    async def acheck(self) -> Interpreter:
        """Check now that the image's interpreter loads this client's calls (see :func:`probe`), and return it.
        Done by the first call anyway; one command per site and image in a process."""
        return await self._check()

    check = _loop.blocking(acheck)

    async def _check(self) -> Interpreter:
        if self._interpreter is None:
            if self.check_versions:
                found = await interpreter(self.site, self.image)
                compatible(found)
            else:  # not asked: assume this Python, and ship cloudpickle in case the image has none
                here = Interpreter.here()
                found = dataclasses.replace(here, cloudpickle=None, protocol=4, where="the image (not checked)")
            self._interpreter = found
        return self._interpreter

    # -- submitting -----------------------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> JobFuture:
        """Run ``fn(*args, **kwargs)`` as a job; returns its future at once (the version check aside, which the
        first call of a process waits for)."""
        self._open()
        found = self._interpreter or _loop.run(self._check())
        future = self._enqueue(fn, [(args, kwargs)], 1, found)[0]
        self._schedule()
        return future

    async def asubmit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> JobFuture:
        """Async form of :meth:`submit`, from any event loop: returns once the job is submitted (a refusal
        raises here); ``await`` the future for the result."""
        self._open()
        found = await _loop.bridge(self._check())
        future = self._enqueue(fn, [(args, kwargs)], 1, found)[0]
        await _loop.bridge(self._flush())
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator[Any]:  # fmt: skip
        """Like :meth:`concurrent.futures.Executor.map`: ``fn`` over the items, results in order. The calls go at
        once, in one round trip, as one job array whose tasks each run ``chunksize`` calls one after another
        (a task's log holds its calls' output). An exception of a call is raised when its result is reached;
        leaving the iteration early cancels the calls not yet run. A refused submission raises here."""
        futures = self._map(fn, iterables, chunksize, buffersize)
        return _results(futures, timeout)

    async def amap(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int = 1) -> AsyncIterator[Any]:
        """Async form of :meth:`map`: ``async for result in ex.amap(fn, items)``."""
        self._open()
        found = await _loop.bridge(self._check())
        futures = self._enqueue(fn, [(args, {}) for args in zip(*iterables, strict=False)], chunksize, found)
        await _loop.bridge(self._flush())
        try:
            for future in futures:
                yield await future
        finally:
            for future in futures:
                future.cancel()

    def _map(self, fn: Callable[..., Any], iterables: Sequence[Iterable[Any]], chunksize: int,
             buffersize: int | None) -> list[JobFuture]:  # fmt: skip
        if buffersize is not None:
            raise ConfigError("Executor.map sends every call at once, as one job array: buffersize is not supported")
        self._open()
        found = self._interpreter or _loop.run(self._check())
        futures = self._enqueue(fn, [(args, {}) for args in zip(*iterables, strict=False)], chunksize, found)
        _loop.run(self._flush())
        return futures

    def _open(self) -> None:
        if self._shut:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _enqueue(self, fn: Callable[..., Any], calls: Sequence[tuple[tuple, dict]], chunksize: int,
                 found: Interpreter) -> list[JobFuture]:  # fmt: skip
        if not callable(fn):
            raise TypeError(f"{fn!r} is not callable")
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError(f"chunksize must be a whole number of at least 1, got {chunksize!r}")
        protocol = min(pickle.HIGHEST_PROTOCOL, found.protocol)
        with by_value(self._by_value):
            fn_bytes = cloudpickle.dumps(fn, protocol=protocol)
            blobs = [cloudpickle.dumps(call, protocol=protocol) for call in calls]
        items = [_Call(JobFuture(self), blob) for blob in blobs]
        tasks = [items[i : i + chunksize] for i in range(0, len(items), chunksize)]
        with self._lock:
            self._open()
            self._futures.update(item.future for item in items)
            if tasks:
                self._pending.append(_Work(fn_bytes, self.name or _job_name(fn), tasks))
        for item in items:
            item.future.add_done_callback(self._discard)
        return [item.future for item in items]

    def _discard(self, future: concurrent.futures.Future) -> None:
        with self._lock:
            self._futures.discard(future)  # type: ignore[arg-type]

    def _not_done(self) -> list[JobFuture]:
        with self._lock:
            return list(self._futures)

    def _schedule(self) -> None:
        """Send what is queued a moment from now, in one round trip with whatever else comes meanwhile."""
        with self._lock:
            if self._flush_due:
                return
            self._flush_due = True
        _loop.spawn(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(LINGER)
        with self._lock:
            self._flush_due = False
        with contextlib.suppress(Exception):  # the futures carry the error
            await self._flush()

    def _sending_lock(self) -> asyncio.Lock:
        running = asyncio.get_running_loop()
        if self._sending is None or self._sending[0] is not running:  # first use, or a fresh loop after fork()
            self._sending = (running, asyncio.Lock())
        return self._sending[1]

    async def _flush(self) -> None:
        """Send everything queued, one submission at a time (what comes meanwhile goes in the next)."""
        async with self._sending_lock():
            with self._lock:
                works, self._pending = self._pending, []
            works = _merge(works)
            if not works:
                return
            calls = [call for work in works for task in work.tasks for call in task]
            try:
                tasks = await self._send(works)
            except BaseException as exc:
                for call in calls:
                    if not call.future._sent.done():
                        call.future._sent.set_result(None)
                    call.future._set(error=exc if isinstance(exc, Exception) else OffloadError(f"submission {exc!r}"))
                raise
            for task in tasks:
                watcher = asyncio.ensure_future(self._watch(task))
                self._watchers.add(watcher)
                watcher.add_done_callback(self._watchers.discard)
            abandoned = [task.job for task in tasks if all(f.cancelled() for f in task.futures)]
            if abandoned:  # cancelled while the submission was under way
                self._cancel_jobs(abandoned)

    async def _send(self, works: list[_Work]) -> list[_Task]:
        found = await self._check()
        ship = found.cloudpickle != cloudpickle.__version__
        limit = DEFAULT_ARRAY
        if self._arrays and any(len(work.tasks) > 1 for work in works):
            limit = (await _array_limit(self.site)) or DEFAULT_ARRAY
        parts: list[tuple[list[list[_Call]], dict[str, bytes]]] = []
        specs: list[JobSpec] = []
        budget = INLINE_BATCH
        batch = _secrets.token_hex(8)
        # Every part's plan is its own (its number in the batch): two parts never make equal specs, which the
        # site would send as one array (two functions of one name whose code went late, called alike).
        part_numbers = itertools.count()
        for work in works:
            groups = ([work.tasks[i : i + limit] for i in range(0, len(work.tasks), limit)] if self._arrays
                      else [[task] for task in work.tasks])  # fmt: skip
            for tasks in groups:
                counter = itertools.count()
                numbered = [[next(counter) for _ in task] for task in tasks]
                inputs = {"fn.pkl": work.fn}
                for t, (task, numbers) in enumerate(zip(tasks, numbered, strict=True)):
                    inputs[f"call.{t}.pkl"] = pickle.dumps(list(zip(numbers, (c.blob for c in task), strict=True)))
                inline, late = {}, {}
                for file_name, data in inputs.items():
                    if len(data) <= INLINE_FILE and len(data) <= budget:
                        inline[file_name] = data
                        budget -= len(data)
                    else:
                        late[file_name] = data
                plan = {
                    "v": 1,
                    "python": list(found.version[:2]),
                    "protocol": min(pickle.HIGHEST_PROTOCOL, found.protocol),
                    "tasks": numbered,  # each task's calls, by their number in this directory (result.<n>.pkl)
                    "late": sorted(late),  # inputs written after the submission; READY says they are whole
                    "patience": LATE_PATIENCE,
                    "part": next(part_numbers),
                    "batch": batch,
                    "created": time.time(),
                    "site": self.site.name,
                }
                files = {PLAN: json.dumps(plan).encode(), **inline}
                if ship:
                    files["cloudpickle.zip"] = cloudpickle_zip()
                spec = dataclasses.replace(self._template, files=files, name=work.name)
                specs += [spec] * len(tasks)
                parts.append((tasks, late))
        jobs = await self.site.asubmit_many(specs)
        made: list[_Task] = []
        position = 0
        uploads = []
        for tasks, late in parts:
            # An array's tasks share one directory; a scheduler without arrays gives each job its own.
            folders: dict[str, list[_Task]] = {}
            counter = itertools.count()
            for task in tasks:
                job = jobs[position]
                position += 1
                numbers = [next(counter) for _ in task]
                folder = folders.setdefault(job.ref.jobdir, [])
                folder.append(_Task(job, numbers, [call.future for call in task], _Dir(job.ref.jobdir, 0)))
            for jobdir, in_it in folders.items():
                shared = _Dir(jobdir, len(in_it))
                for task in in_it:
                    task.folder = shared
                made += in_it
                if late:
                    uploads.append(self._upload(in_it[0].job, late, in_it))
        for task in made:
            for future in task.futures:
                future._task = task
                future._sent.set_result(task.job)
        if uploads:
            await asyncio.gather(*uploads)
        return made

    async def _upload(self, job: Job, late: dict[str, bytes], tasks: list[_Task]) -> None:
        """The large inputs of one job directory, then the mark its tasks wait for; if that fails, the tasks are
        cancelled and their calls fail with the reason."""
        try:
            for file_name, data in late.items():
                await job.aput(file_name, data)
            await job.aput(READY, b"")
        except OffloadError as exc:
            error = TransportError(f"could not send the large inputs of job {job.id} to {self.site.name}: {exc}")
            for task in tasks:
                for future in task.futures:
                    future._set(error=error)
            self._cancel_jobs([task.job for task in tasks])

    # -- watching and results -------------------------------------------------------------------------------

    async def _watch(self, task: _Task) -> None:
        job = task.job
        outcomes: dict[int, bytes | BaseException]
        try:
            status = await job.await_state(JobState.RUNNING, or_end=True)
            if status.state is JobState.RUNNING:
                for future in task.futures:
                    future._running()
            status = await job.finished()
            if all(future.cancelled() for future in task.futures):
                outcomes = {}
            else:
                outcomes = await self._outcomes(task, status)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            outcomes = dict.fromkeys(task.numbers, exc)
        await asyncio.to_thread(_resolve, task, outcomes)
        await self._done_with(task)

    async def _outcomes(self, task: _Task, status: JobStatus) -> dict[int, bytes | BaseException]:
        """Each call's pickled outcome, or the error that stands for it: the job ended before the call did."""
        job = task.job
        wanted = list(task.numbers)
        found: dict[int, bytes | BaseException] = {}
        # The runner writes its results before it exits (0, 1 or 2): on a slow shared file system they may show
        # a moment after the job's end. A killed job has no exit code, and no results to wait for.
        deadline = time.monotonic() + (RESULT_GRACE if status.exit_code in (0, 1, 2) else 0)
        while True:
            reads = await asyncio.gather(*(_read(job, f"result.{n}.pkl") for n in wanted))
            for number, data in zip(wanted, reads, strict=True):
                if data:
                    found[number] = data
            wanted = [n for n in wanted if n not in found]
            if not wanted or time.monotonic() >= deadline:
                break
            await asyncio.sleep(1.0)
        if wanted:
            tail = await job.atail(20)
            cause = f" ({status.cause.value})" if status.cause and status.cause.value not in status.describe() else ""
            if status.state is JobState.COMPLETED:
                error: BaseException = RemoteError(
                    f"job {job.id} on {self.site.name} completed but left no result for its call (result file missing "
                    f"in {job.ref.jobdir}). Last lines of its log:\n{tail}"
                )
            else:
                error = JobDiedError(
                    f"job {job.id} on {self.site.name} ended {status.describe()}{cause} before its call returned. "
                    f"Last lines of its log:\n{tail}",
                    status=status, job_id=job.id, log_tail=tail,
                )  # fmt: skip
            found.update(dict.fromkeys(wanted, error))
        return found

    async def _done_with(self, task: _Task) -> None:
        task.folder.left -= 1
        if not self.cleanup or task.folder.left > 0:
            return
        jobdir = task.folder.jobdir
        try:
            jobs = f"{await self.site.aworkdir()}/jobs"
            if posixpath.dirname(jobdir) != jobs or posixpath.basename(jobdir) in ("", ".", ".."):
                log.warning("not removing %s: not a job directory in %s", jobdir, jobs)
                return
            await self.site.transport.run(["rm", "-rf", "--", jobdir], timeout=120)
        except OffloadError as exc:
            log.warning("could not remove the job directory %s on %s (%s): remove it there", jobdir, self.site.name,
                        exc)  # fmt: skip

    # -- cancelling -----------------------------------------------------------------------------------------

    def _cancelled(self, future: JobFuture) -> None:
        """A future was cancelled: its job goes too, once no call of its task still wants it."""
        task = future._task
        if task is not None and all(f.cancelled() for f in task.futures):
            self._cancel_jobs([task.job])

    def _cancel_jobs(self, jobs: list[Job]) -> None:
        """Cancel ``jobs`` on the site soon, together with others cancelled meanwhile (one scheduler call); a
        process that exits first still sends it."""
        with self._lock:
            first = not self._to_cancel
            self._to_cancel += jobs
            if self._holding or not first:
                return
        _loop.loop().call_soon_threadsafe(_loop.keep, self._cancel_soon())

    async def _cancel_soon(self) -> None:
        await asyncio.sleep(LINGER)
        with self._lock:
            jobs, self._to_cancel = self._to_cancel, []
        await self._cancel_now(jobs)

    async def _cancel_now(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:
            await self.site.acancel(jobs, timeout=60)
        except OffloadError as exc:
            log.warning("could not cancel %d job(s) of cancelled calls on %s: %s", len(jobs), self.site.name, exc)

    def _cancel_queued(self) -> list[Job]:
        """Cancel every call not running yet; the jobs to cancel for them, to send in one scheduler call."""
        with self._lock:
            self._holding = True
        try:
            for future in self._not_done():
                future.cancel()
        finally:
            with self._lock:
                self._holding = False
                jobs, self._to_cancel = self._to_cancel, []
        return jobs

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls. ``cancel_futures``: cancel every call whose job has not started (queued here or in the
        site's queue: those jobs are cancelled there, in one scheduler call). ``wait``: return once every call
        is done. Calls still running on the site when this process ends keep their results there."""
        with self._lock:
            self._shut = True
        jobs = self._cancel_queued() if cancel_futures else []
        if _loop.on_private_loop():  # from offload's own thread (a callback): nothing here may block
            if jobs:
                _loop.keep(self._cancel_now(jobs))
            return
        with contextlib.suppress(Exception):  # a failed submission is in its futures
            _loop.run(self._flush())
        if jobs and wait:
            _loop.run(self._cancel_now(jobs))
        elif jobs:  # sent in the background; an exiting interpreter waits for it
            _loop.loop().call_soon_threadsafe(_loop.keep, self._cancel_now(jobs))
        if wait:
            concurrent.futures.wait(self._not_done())

    async def ashutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Async form of :meth:`shutdown`."""
        with self._lock:
            self._shut = True
        jobs = self._cancel_queued() if cancel_futures else []
        with contextlib.suppress(Exception):
            await _loop.bridge(self._flush())
        await _loop.bridge(self._cancel_now(jobs))
        left = self._not_done()
        if wait and left:
            await asyncio.wait([asyncio.wrap_future(f) for f in left])

    async def __aenter__(self) -> Executor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ashutdown(wait=True)

    # -- futures of other processes -------------------------------------------------------------------------

    @_loop.on_loop
    async def aattach(self, job_id: str, *, jobdir: str | None = None, index: int | None = None) -> JobFuture:
        """The future of the call(s) job ``job_id`` runs, from any process: a client killed after ``submit``
        leaves its results in the job's directory, which this reads once the job ended. For an array task of a
        ``map`` with ``chunksize`` above 1, the future's result is the list of its calls' results. The job is
        found in this machine's job records; from another machine, give its ``jobdir`` (and array ``index``)."""
        return await self._attach_id(job_id, jobdir, index)

    attach = _loop.blocking(aattach)

    @_loop.on_loop
    async def aattach_name(self, name: str) -> list[JobFuture]:
        """The futures of the jobs named ``name`` (``Executor(name=...)``) that the site still knows of (or this
        machine's records, where the scheduler cannot say): one per job or array task, in the order they were
        submitted."""
        return await self._attach_name(name)

    attach_name = _loop.blocking(aattach_name)

    async def _attach_id(self, job_id: str, jobdir: str | None, index: int | None) -> JobFuture:
        job = await self.site.ajob(str(job_id), jobdir=jobdir, index=index)
        if not job.ref.jobdir:
            raise OffloadError(f"job {job_id} on {self.site.name} is not in this machine's records: give its "
                               "directory, Executor.attach(job_id, jobdir=...)")  # fmt: skip
        return (await self._attach([job], quiet=False))[0]

    async def _attach_name(self, name: str) -> list[JobFuture]:
        return await self._attach([job for job in await self.site.afind(name) if job.ref.jobdir], quiet=True)

    async def _attach(self, jobs: list[Job], quiet: bool) -> list[JobFuture]:
        plans: dict[str, dict] = {}
        folders: dict[str, _Dir] = {}
        made: list[tuple[tuple, _Task]] = []
        for job in jobs:
            jobdir = job.ref.jobdir
            if jobdir not in plans:
                raw = await job.aget(PLAN)
                plans[jobdir] = json.loads(raw) if raw else {}
            plan = plans[jobdir]
            if not plan:
                if quiet:
                    continue
                raise OffloadError(f"job {job.id} on {self.site.name} is not a call of offload.Executor (no {PLAN} in "
                                   f"{jobdir})")  # fmt: skip
            tasks = plan["tasks"]
            if len(tasks) > 1 and job.ref.index is None:
                if quiet:
                    continue
                raise OffloadError(f"job {job.id} on {self.site.name} is an array of {len(tasks)} tasks: attach each "
                                   "task by its own id, or give index=")  # fmt: skip
            index = job.ref.index if len(tasks) > 1 else 0
            assert index is not None
            # the directory is cleaned (cleanup=True) only once every task of its plan was attached and read
            folder = folders.setdefault(jobdir, _Dir(jobdir, len(tasks)))
            future = JobFuture(self)
            task = _Task(job, list(tasks[index]), [future], folder, gather=True)
            future._task = task
            future._sent.set_result(job)
            with self._lock:
                self._futures.add(future)
            future.add_done_callback(self._discard)
            made.append(((plan.get("created", 0), plan.get("part", 0), index), task))
        made.sort(key=lambda pair: pair[0])
        for _, task in made:
            watcher = asyncio.ensure_future(self._watch(task))
            self._watchers.add(watcher)
            watcher.add_done_callback(self._watchers.discard)
        return [task.futures[0] for _, task in made]


async def _read(job: Job, name: str) -> bytes:
    """A file of the job's directory, read again through a dropped connection for a few minutes."""
    return await _READS.call(functools.partial(job.aget, name), lambda exc: isinstance(exc, TransportError))


def _merge(works: list[_Work]) -> list[_Work]:
    """Drop cancelled calls, and put the calls of one function together (one array)."""
    merged: dict[tuple[bytes, str], _Work] = {}
    for work in works:
        tasks = []
        for task in work.tasks:
            live = [call for call in task if not call.future.cancelled()]
            for call in task:
                if call.future.cancelled():
                    call.future._sent.set_result(None)
            if live:
                tasks.append(live)
        if tasks:
            merged.setdefault((work.fn, work.name), _Work(work.fn, work.name, [])).tasks.extend(tasks)
    return list(merged.values())


_limits: weakref.WeakKeyDictionary[Site, int] = weakref.WeakKeyDictionary()


async def _array_limit(site: Site) -> int:
    """How many tasks one array may have on ``site`` (asked once per process). The executor keeps its arrays
    within it, so the site never splits one and a task's array index is its place in its directory's plan."""
    if site not in _limits:
        try:
            _limits[site] = (await site.scheduler.limits(site.transport)).get("max_array_size") or DEFAULT_ARRAY
        except OffloadError:
            return DEFAULT_ARRAY
    return _limits[site]


def _resolve(task: _Task, outcomes: dict[int, bytes | BaseException]) -> None:
    """Set the futures of ``task`` from its outcomes (in a worker thread: unpickling runs the user's code, and
    callbacks may call offload's sync API)."""
    if not outcomes:  # every call of the task was cancelled
        return
    values = [_outcome(task, number, outcomes[number]) for number in task.numbers]
    if task.gather:
        future = task.futures[0]
        errors = [error for _, error in values if error is not None]
        if errors:
            future._set(error=errors[0])
        else:
            results = [value for value, _ in values]
            future._set(results[0] if len(results) == 1 else results)
        return
    for future, (value, error) in zip(task.futures, values, strict=True):
        if not future.cancelled():
            future._set(value, error)


def _outcome(task: _Task, number: int, raw: bytes | BaseException) -> tuple[Any, BaseException | None]:
    job = task.job
    if isinstance(raw, BaseException):
        return None, raw
    try:
        outcome = pickle.loads(raw)
    except Exception as exc:
        return None, RemoteError(f"the result of job {job.id}'s call could not be loaded here: {exc!r}")
    kind = outcome[0]
    if kind == "ok":
        return outcome[1], None
    if kind == "failed":
        return None, RemoteError(f"job {job.id} on {job.site.name} could not run its call: {outcome[1]}")
    _, raised, text, type_name, message = outcome
    error: BaseException | None = None
    if raised is not None:
        with contextlib.suppress(Exception):
            error = pickle.loads(raised)
    if not isinstance(error, BaseException):
        return None, RemoteError(f"{type_name}: {message} (raised in job {job.id} on site {job.site.name}; its "
                                 f"remote traceback:\n{text})", type_name=type_name, remote_traceback=text)  # fmt: skip
    error.__cause__ = RemoteTraceback(text)
    with contextlib.suppress(Exception):
        error.add_note(f"(raised in job {job.id} on site {job.site.name}; the remote traceback is above)")
    return None, error


def _results(futures: list[JobFuture], timeout: float | None) -> Iterator[Any]:
    """The results of ``futures`` in order, within ``timeout`` seconds for all; what is left is cancelled when
    the iteration stops early (an exception, a timeout, a ``break``)."""
    end = None if timeout is None else time.monotonic() + timeout
    left = list(reversed(futures))
    try:
        while left:
            future = left.pop()
            try:
                yield future.result(None if end is None else max(0.0, end - time.monotonic()))
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise
    finally:
        for future in left:
            future.cancel()


# -- the decorator ----------------------------------------------------------------------------------------------


class RemoteFunction:
    """A function whose calls run as jobs (``@offload.remote``): ``f(x)`` returns a :class:`JobFuture`,
    ``f.map(items)`` the results in order (one job array), ``f.executor`` the :class:`Executor` behind it."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        functools.update_wrapper(self, fn)
        self._options = options
        self._executor: Executor | None = None
        self._made = threading.Lock()

    @property
    def executor(self) -> Executor:
        """Made at the first call (the site's profile is read then)."""
        with self._made:
            if self._executor is None:
                self._executor = Executor(**self._options)
            return self._executor

    def __call__(self, *args: Any, **kwargs: Any) -> JobFuture:
        return self.executor.submit(self.__wrapped__, *args, **kwargs)  # type: ignore[attr-defined]

    async def asubmit(self, *args: Any, **kwargs: Any) -> JobFuture:
        return await self.executor.asubmit(self.__wrapped__, *args, **kwargs)  # type: ignore[attr-defined]

    def map(self, *iterables: Iterable[Any], timeout: float | None = None, chunksize: int = 1) -> Iterator[Any]:
        return self.executor.map(self.__wrapped__, *iterables, timeout=timeout, chunksize=chunksize)  # type: ignore[attr-defined]

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Call the function here, in this process."""
        return self.__wrapped__(*args, **kwargs)  # type: ignore[attr-defined]

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (the function refers to itself by its global name, e.g. to recurse), it becomes the plain
        # function: on the site a call is a call. copy.copy returns a function as it is, and the site has it.
        return (copy.copy, (self.__wrapped__,))  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"<offload.remote {getattr(self, '__qualname__', '?')}>"


def remote(fn: Callable[..., Any] | None = None, /, **options: Any) -> Any:
    """``@offload.remote(site="leonardo", gpus=1)``: calls of the function run as jobs and return futures.

    Takes :class:`Executor`'s keywords; bare ``@offload.remote`` runs on the default site::

        @offload.remote(site="leonardo", gpus=1, walltime="00:30:00")
        def train(lr): ...

        future = train(0.01)          # a job; future.result() waits for it
        losses = list(train.map([0.1, 0.01, 0.001]))   # one job array
    """
    if fn is not None:
        if not callable(fn):
            raise TypeError("@offload.remote takes keywords: @offload.remote(site='leonardo', gpus=1)")
        return RemoteFunction(fn, options)
    return functools.partial(RemoteFunction, options=options)
