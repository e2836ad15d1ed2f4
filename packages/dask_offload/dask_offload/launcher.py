"""Runs inside the job's container: a Dask scheduler, or the Dask workers of one job.

This file is sent as the job's ``python3 -c`` program, so it may import only the standard library and
``distributed`` (what the image must have). It never reads files from the client: TLS credentials arrive as
environment variables (offload secrets), the scheduler's address, the worker names and their options as
arguments.

Workers: ``distributed`` is imported once, then one process per worker is forked from this one, so N workers
cost one import (dask-jobqueue's ``dask worker`` pays an import per worker, and another per nanny). On a GPU
job each forked worker sees exactly one of the job's GPUs in ``CUDA_VISIBLE_DEVICES``. With ``nanny`` each
forked process runs a Nanny, which restarts its worker in place (``client.restart()`` works); without, when any
worker process exits the others are stopped and the job ends, so the cluster sees the loss and replaces the job.
Every log line of a worker starts with ``[its name]``, so its job's log splits back into one log per worker.

    python3 -c SOURCE scheduler EXPECT_JSON OPTIONS_JSON
    python3 -c SOURCE worker EXPECT_JSON ADDRESS GROUPS_JSON OPTIONS_JSON
"""

import asyncio
import contextlib
import gc
import importlib.util
import json
import logging
import os
import platform
import signal
import socket
import sys
import types

MARK = "OFFLOAD_DASK"


class NumpyOnFirstUse(types.ModuleType):
    """What ``import distributed`` binds as ``numpy`` in a job: numpy itself is imported when first used.

    distributed imports numpy at its own import for one thing, to allocate the buffers it reads messages into
    (``distributed.protocol.utils.host_array``: ``numpy.empty`` skips the zeroing a ``bytearray`` does). That is a
    third of the job's import CPU (0.42 to 0.29 s, issue 30), spent before the worker can register, and every job
    of a cluster pays it at once. Here small buffers, which are all a worker reads until it is given data, come
    from ``bytearray`` as distributed's own code does without numpy; a large one, or any other use, imports the
    real numpy and hands it on. Only distributed's module holds this object: ``import numpy`` anywhere else,
    a task's included, gets the real module."""

    SMALL = 64 * 1024  # zeroing this much costs a few microseconds

    def real(self):
        if sys.modules.get("numpy") is self:  # still inside distributed's import: make way for the real one
            del sys.modules["numpy"]
        return importlib.import_module("numpy")

    def __getattr__(self, name):
        return getattr(self.real(), name)

    def empty(self, shape, dtype=float, *args, **kwargs):
        if sys.modules.get("numpy") is None and dtype == "u1" and len(shape) == 1 and shape[0] < self.SMALL:
            return types.SimpleNamespace(data=memoryview(bytearray(shape[0])))
        return self.real().empty(shape, dtype, *args, **kwargs)


def import_distributed():
    """Import distributed for this job at the least CPU: with numpy deferred (``NumpyOnFirstUse``) and the
    garbage collector paused, then its objects frozen, so that neither this process nor the workers forked from
    it scan them again (what the ``gc.freeze`` documentation advises before a fork). On a busy node every job
    imports at the same moment, so the CPU one saves is time every worker of the cluster gets back."""
    if "distributed" in sys.modules:
        return sys.modules["distributed"]
    standin = None
    if "numpy" not in sys.modules and importlib.util.find_spec("numpy") is not None:
        standin = sys.modules["numpy"] = NumpyOnFirstUse("numpy")
    paused = gc.isenabled()
    gc.disable()
    try:
        import distributed
    finally:
        if standin is not None and sys.modules.get("numpy") is standin:
            del sys.modules["numpy"]
        gc.freeze()
        if paused:
            gc.enable()
    return distributed


def versions():
    distributed = import_distributed()
    return {"python": ".".join(platform.python_version_tuple()[:2]), "distributed": distributed.__version__}


def check_versions(expect):
    try:
        found = versions()
    except ImportError:
        found = {"python": ".".join(platform.python_version_tuple()[:2]), "distributed": None}
    if found != expect:
        print(f"{MARK}_MISMATCH {json.dumps({'image': found, 'client': expect})}", flush=True)
        sys.exit(3)


def node_address():
    """The address other nodes reach this one at: its hostname's, else the interface of the default route.

    distributed's own guess asks for a route to 8.8.8.8, which compute nodes without outbound network lack."""
    host = socket.gethostname()
    try:
        for info in socket.getaddrinfo(host, None, socket.AF_INET):
            if not info[4][0].startswith("127."):
                return info[4][0]
    except OSError:
        pass
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("8.8.8.8", 80))
        return probe.getsockname()[0]
    except OSError:
        return host
    finally:
        probe.close()


def where_to_listen(options):
    """``interface`` (e.g. ``ib0``) when given, as dask-jobqueue's keyword means; else the node's address."""
    if options.get("interface"):
        return {"interface": options["interface"]}
    return {"host": node_address()}


def check_reachable(address):
    """Fail fast, and say why, when this node cannot open a connection to the scheduler."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=20).close()
    except OSError as exc:
        info = {"address": address, "node": socket.gethostname(), "error": str(exc)}
        print(f"{MARK}_UNREACHABLE {json.dumps(info)}", flush=True)
        sys.exit(5)


def set_log_level(options):
    """``silence_logs``: the level of distributed's loggers in this job (its handlers stay as distributed made
    them). Called after distributed is imported, which configures its logging."""
    if options.get("log_level") is not None:
        logging.getLogger("distributed").setLevel(options["log_level"])


def security():
    ca = os.environ.get("OFFLOAD_DASK_TLS_CA")
    if not ca:
        return None
    from distributed.security import Security

    cert, key = os.environ["OFFLOAD_DASK_TLS_CERT"], os.environ["OFFLOAD_DASK_TLS_KEY"]
    roles = {f"tls_{role}_{kind}": value for role in ("scheduler", "worker", "client")
             for kind, value in (("cert", cert), ("key", key))}  # fmt: skip
    return Security(tls_ca_file=ca, require_encryption=True, **roles)


async def run_scheduler(options):
    from distributed import Scheduler

    set_log_level(options)
    sec = security()
    protocol = "tls://" if sec else "tcp://"
    extra = dict(options.get("scheduler_options") or {})
    # The dashboard has no login: it listens on the node's loopback, which the client reaches through the job's
    # relay; workers and the client reach the scheduler itself (TLS) on the node's address.
    dashboard_port = extra.pop("dashboard_port", 0)
    pages = extra.pop("dashboard", True)  # its pages come once the address is out (see serve_dashboard)
    async with Scheduler(protocol=protocol, port=extra.pop("port", 0), security=sec, dashboard=False,
                         dashboard_address=f"127.0.0.1:{dashboard_port}", **where_to_listen(options),
                         **extra) as scheduler:  # fmt: skip
        dashboard = scheduler.services.get("dashboard")
        info = {"address": scheduler.address, "dashboard": dashboard.port if dashboard else None, **versions()}
        print(f"{MARK}_SCHEDULER {json.dumps(info)}", flush=True)
        if pages:
            await asyncio.sleep(0)
            serve_dashboard(scheduler, extra.get("http_prefix", "/"))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(scheduler.close()))
        watch = asyncio.ensure_future(close_when_abandoned(scheduler, float(options["idle_timeout"])))
        await scheduler.finished()
        watch.cancel()


def serve_dashboard(scheduler, prefix):
    """Add the dashboard's pages to the scheduler's running HTTP server. Their import (bokeh) is the largest of
    the scheduler's: done in Scheduler() it delays the moment the scheduler listens, which every worker waits
    for, by about half a second on a busy node (issue 30's profile); done here, the workers have the address
    already. Without bokeh in the image the scheduler serves its plain routes, as distributed does."""
    try:
        import distributed.dashboard.scheduler as pages
    except ImportError:
        logging.getLogger("distributed.scheduler").info("no bokeh in the image: the scheduler serves no dashboard")
        return
    pages.connect(scheduler.http_application, scheduler.http_server, scheduler, prefix=prefix)


async def close_when_abandoned(scheduler, idle_timeout):
    """A scheduler no client has talked to for ``idle_timeout`` seconds (its client crashed) ends its job."""
    alone_since = None
    while True:
        await asyncio.sleep(min(5.0, idle_timeout / 4))
        clients = [c for c in scheduler.clients if c != "fire-and-forget"]
        if clients:
            alone_since = None
        elif alone_since is None:
            alone_since = asyncio.get_running_loop().time()
        elif asyncio.get_running_loop().time() - alone_since > idle_timeout:
            print(f"{MARK}_ABANDONED no client for {idle_timeout:g} s: closing the scheduler", flush=True)
            await scheduler.close()
            return


def prefix_logs(name):
    """Every log line of this worker process starts with ``[name]`` (its job's log holds several workers)."""

    class Prefix(logging.Filter):
        def filter(self, record):
            if not getattr(record, "offload_prefixed", False):
                record.msg = f"[{name}] {record.msg}"
                record.offload_prefixed = True
            return True

    for handler in logging.getLogger().handlers + logging.getLogger("distributed").handlers:
        handler.addFilter(Prefix())


async def run_worker(address, name, options):
    from distributed import Nanny, Worker

    kwargs = {
        "name": name, "nthreads": options["nthreads"], "memory_limit": options["memory_limit"],
        "resources": options.get("resources") or None, "security": security(),
        "death_timeout": options.get("death_timeout"), "local_directory": options.get("local_directory"),
        **where_to_listen(options), **(options.get("worker_kwargs") or {}),
    }  # fmt: skip
    server_cls = Nanny if options.get("nanny") else Worker
    async with server_cls(address, **{k: v for k, v in kwargs.items() if v is not None}) as server:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(server.close()))
        await server.finished()


def scheduler_address(address, death_timeout=None):
    """``file``: the job was submitted with the scheduler's own job; the client writes the scheduler's address
    into this job's directory as soon as the scheduler reports it. A client that died before it did never
    will: after ``death_timeout`` seconds (as a worker waits for a scheduler that is gone) the job ends, saying
    why, instead of holding its node forever."""
    if address != "file":
        return address
    import time

    path = os.path.join(os.environ["OFFLOAD_JOB_DIR"], "scheduler.json")
    deadline = None if death_timeout is None else time.monotonic() + float(death_timeout)
    while True:
        try:
            with open(path) as f:
                return json.load(f)["address"]
        except (OSError, ValueError, KeyError):  # not there yet, or half written
            if deadline is not None and time.monotonic() > deadline:
                print(f"{MARK}_ERROR no scheduler address after death_timeout={death_timeout} s: the client that "
                      "submitted this job is gone; the job ends", flush=True)  # fmt: skip
                sys.exit(3)
            time.sleep(0.2)


def run_workers(address, groups, options):
    index = int(os.environ.get("OFFLOAD_TASK_INDEX") or 0)
    names = groups[index]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in (visible or "").split(",") if g]
    resources = options.get("resources") or {}
    pin = bool(resources.get("GPU")) and visible is not None  # no GPU scheduling (a laptop): do not pin
    if pin and len(gpus) < len(names):
        print(f"{MARK}_ERROR {len(names)} GPU workers but CUDA_VISIBLE_DEVICES={gpus}", flush=True)
        sys.exit(4)
    import_distributed()  # once here, shared by every forked worker

    set_log_level(options)

    address = scheduler_address(address, options.get("death_timeout"))
    check_reachable(address)

    children = {}
    for i, name in enumerate(names):
        pid = os.fork()
        if pid == 0:
            if pin:
                os.environ["CUDA_VISIBLE_DEVICES"] = gpus[i]
            prefix_logs(name)
            code = 0
            try:
                asyncio.run(run_worker(address, name, options))
            except BaseException as exc:  # report, then leave without running the parent's cleanup
                print(f"{MARK}_WORKER_FAILED {name}: {exc!r}", flush=True)
                code = 1
            os._exit(code)
        children[pid] = name
    print(f"{MARK}_WORKERS {json.dumps(names)}", flush=True)

    def stop(signum, frame):
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = 0
    while children:
        pid, wait_status = os.wait()
        children.pop(pid, None)
        status = status or os.waitstatus_to_exitcode(wait_status)
        stop(None, None)  # one worker gone: stop the job, so the cluster sees it and replaces the job
    sys.exit(abs(status))


def set_worker_environ(environ):
    """Give this job the environment distributed's Nanny gives each worker process it starts (``environ``, from
    the client's Dask config: ``distributed.nanny.pre-spawn-environ`` and ``.environ``), before distributed is
    imported. As with the Nanny, a variable the job already has keeps its value. (Those read only as a process
    starts, ``PYTHONHASHSEED`` and ``MALLOC_TRIM_THRESHOLD_``, come in the job's environment: see the cluster.)

    ``OMP/MKL/OPENBLAS_NUM_THREADS=1`` also make the import cheaper where the job is not confined to its cores:
    numpy's OpenBLAS starts a thread per core of the node (0.045 s of CPU on issue 30's 2-core test site)."""
    for name, value in environ.items():
        os.environ.setdefault(name, value)


def main(argv):
    mode, expect = argv[0], json.loads(argv[1])
    if mode == "worker":
        set_worker_environ(json.loads(argv[4]).get("environ") or {})
    check_versions(expect)
    if mode == "scheduler":
        asyncio.run(run_scheduler(json.loads(argv[2])))
    elif mode == "worker":
        run_workers(argv[2], json.loads(argv[3]), json.loads(argv[4]))
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
