"""``OffloadCluster``: a Dask cluster whose scheduler and workers are jobs on an offload site.

It is a :class:`distributed.deploy.SpecCluster`: a dict of worker-job specs that the cluster reconciles.
Each spec is one job running several workers (one per GPU on GPU clusters); names are
``<cluster>-<job>-<worker>``. What dask-jobqueue leaves out is done here by default:

* the scheduler runs on the site (a small job of its own) and is reached through a 127.0.0.1 port forward on
  the site's SSH connection, so compute nodes never need to reach the client;
* TLS with per-cluster temporary certificates, which travel as offload secrets (never in scripts or logs);
* worker jobs started together are submitted together: one round trip, identical jobs as one job array;
* the core's poller watches every job: a job that fails or hits its walltime is replaced while the cluster is
  scaled up, and the user is told why, once;
* ``close()``, interpreter exit, SIGINT and SIGTERM cancel every job of the cluster, in one scheduler call.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import inspect
import json
import logging
import math
import platform
import signal
import threading
import time
import warnings
import weakref
from secrets import token_hex
from typing import Any

import dask.config
import distributed
from distributed.comm.core import CommClosedError
from distributed.core import Status
from distributed.deploy.spec import ProcessInterface, SpecCluster
from distributed.scheduler import Scheduler
from distributed.security import Security
from distributed.utils import Log, Logs
from distributed.versions import VersionMismatchWarning

import offload
from dask_offload import launcher, options
from dask_offload.options import ClusterOptions
from dask_offload.tls import temporary_security

log = logging.getLogger("dask_offload")


LAUNCHER = inspect.getsource(launcher)
# offload checks, before any worker is submitted, that the image runs the client's Python (major.minor) and
# exactly its distributed. A table that differs in the Python row alone (3.11.7 here, 3.11.2 in the image) is
# a patch level that does not matter: distributed's warning about it is noise. Any other row still shows.
warnings.filterwarnings(
    "ignore",
    message=r"Mismatched versions found\s+\+[-+]+\+\s+\| Package [^\n]*\n\+[-+]+\+\n\| python [^\n]*\n\+[-+]+\+\s*\Z",
    category=VersionMismatchWarning,
)
ARRAY_FROM = 16  # worker jobs started together from this many on go as one job array


def expected_versions() -> dict[str, str]:
    """What the image must run: the client's Python (major.minor) and exactly its ``distributed``."""
    return {"python": ".".join(platform.python_version_tuple()[:2]), "distributed": distributed.__version__}


class VersionMismatchError(offload.OffloadError):
    """The image's Python or ``distributed`` differs from the client's: workers would not talk to it."""


AT_START = ("PYTHONHASHSEED", "MALLOC_TRIM_THRESHOLD_")  # of worker_environ(): read as the process starts


def worker_environ() -> dict[str, str]:
    """The environment distributed's Nanny sets for each worker process it starts, from this client's Dask config
    (``distributed.nanny.pre-spawn-environ``, then ``distributed.nanny.environ``; a null value unsets), with the
    Nanny's fixed ``PYTHONHASHSEED``. dask-jobqueue's workers get it from their Nanny; offload's worker jobs fork
    their workers: the job's environment has what acts only from a process's start (``AT_START``), the launcher
    sets the rest before it imports distributed (``launcher.set_worker_environ``)."""

    def section(key: str) -> dict[str, str]:
        return {name: str(value) for name, value in (dask.config.get(key) or {}).items() if value is not None}

    environ = section("distributed.nanny.pre-spawn-environ")
    if environ.get("PYTHONHASHSEED") in (None, "0"):
        environ["PYTHONHASHSEED"] = "6640"  # the Nanny's value: hash-partitioned results agree between workers
    return environ | section("distributed.nanny.environ")


def describe_mismatch(found: dict[str, dict[str, str | None]]) -> str:
    image, client = found["image"], found["client"]
    has = f"distributed {image['distributed']}" if image["distributed"] else "no distributed"
    return (
        f"the image runs Python {image['python']} with {has}; this client runs Python {client['python']} with "
        f"distributed {client['distributed']}. Install distributed=={client['distributed']} (and Python "
        f"{client['python']}) in the image, or match the client to the image."
    )


def with_epilogue(command: list[str], epilogue: tuple[str, ...]) -> list[str]:
    """``command`` followed by dask-jobqueue's ``job_script_epilogue`` lines, keeping the command's exit code.

    offload's batch script has a prologue but no epilogue, so the lines run in the job's container, in a shell
    that gets the command as its arguments (``"$@"``): the command is never re-quoted into shell text, and the
    lines are shell code, as in dask-jobqueue's script. A cancelled job (``close()``, scancel) ends before them,
    as dask-jobqueue's does."""
    program = "\n".join(['"$@"', "offload_status=$?", *epilogue, 'exit "$offload_status"'])
    return ["/bin/sh", "-c", program, "sh", *command]


class _Shared:
    """What the scheduler job and the worker jobs of one cluster share; batches their submissions."""

    def __init__(self, site: offload.Site, name: str, options: ClusterOptions, security: Security | None):
        self.site = site
        self.name = name
        # What the jobs are called (dask-jobqueue's job_name): what `offload status/cancel --name` finds them by.
        self.job_name: str = options.get("job_name") or name
        self.options = options
        self.security = security
        self.jobs: set[offload.Job] = set()
        self._pending: list[tuple[str, list[str], asyncio.Future[offload.Job]]] = []
        self._flush: asyncio.Future[None] | None = None
        self._to_cancel: list[tuple[offload.Job, asyncio.Future[None]]] = []
        self._cancel_flush: asyncio.Future[None] | None = None
        self._told: set[str] = set()
        self._quick_failures = 0
        self.initial_workers: list[tuple[str, list[str]]] = []  # (job name, worker names) started with the cluster
        self.presubmitted: dict[str, offload.Job] = {}
        self.shutting_down = False

    # -- what runs --------------------------------------------------------------------------------------

    @property
    def python(self) -> str:
        return self.options.get("python") or self.site.python

    def secrets(self) -> dict[str, str]:
        given = dict(self.options.get("secrets") or {})
        if self.security is None or not self.security.require_encryption:
            return given
        return given | {
            "OFFLOAD_DASK_TLS_CA": self.security.tls_ca_file,
            "OFFLOAD_DASK_TLS_CERT": self.security.tls_worker_cert,
            "OFFLOAD_DASK_TLS_KEY": self.security.tls_worker_key,
        }

    def cpus(self, wanted: int, given: bool) -> int | None:
        """The CPUs a job asks for: ``wanted`` where the site reserves CPUs, or where the user gave the number
        (job_cpu); else none, as dask-jobqueue's SGECluster asks none: its workers' threads share what the job's
        slot gives (a Grid Engine site refuses cpus above 1)."""
        return wanted if given or self.site.reserves_cpus else None

    def resources(self, *, gpus: int, cpus: int | None, memory_mb: int, worker: bool) -> offload.Resources:
        o = self.options
        return offload.Resources(
            gpus=gpus, cpus=cpus, memory=max(1, memory_mb), walltime=o["walltime"], partition=o["partition"],
            account=o["account"], qos=o["qos"], extra=o.extra if worker else (), skip=o.skip if worker else (),
        )  # fmt: skip

    def spec(self, args: list[str], resources: offload.Resources, worker: bool) -> offload.JobSpec:
        o = self.options
        command = [self.python, "-c", LAUNCHER, args[0], json.dumps(expected_versions()), *args[1:]]
        env = dict(o.get("env", {}))
        if worker and o.epilogue:
            command = with_epilogue(command, o.epilogue)
        if worker:  # what Python and glibc read only as the process starts; the launcher sets the rest
            env = {name: value for name, value in worker_environ().items() if name in AT_START} | env
        return offload.JobSpec(
            command, image=o["image"], resources=resources, env=env, secrets=self.secrets(),
            name=self.job_name, reach=dict(o.get("reach", {})) if worker else {},
            prologue=o.prologue if worker else (), shebang=o["shebang"],
        )  # fmt: skip

    def scheduler_spec(self) -> offload.JobSpec:
        o = self.options
        memory = options.memory_bytes(o["scheduler_memory"]) // 2**20
        resources = self.resources(gpus=0, cpus=self.cpus(int(o["scheduler_cores"]), given=False), memory_mb=memory,
                                   worker=False)  # fmt: skip
        spec = self.spec(["scheduler", json.dumps(o.scheduler)], resources, worker=False)
        return dataclasses.replace(spec, relay=True)  # the dashboard is reached through the job's relay

    def worker_spec(self, address: str, groups: list[list[str]]) -> offload.JobSpec:
        o = self.options
        cpus = self.cpus(o.job_cpus, given=o["job_cpu"] is not None)
        resources = self.resources(gpus=o.per_job if o.gpu else 0, cpus=cpus, memory_mb=o.job_memory_mb, worker=True)
        launch = {**o.worker, "environ": worker_environ()}
        return self.spec(["worker", address, json.dumps(groups), json.dumps(launch)], resources, worker=True)

    # -- batching ---------------------------------------------------------------------------------------

    async def submit_worker_job(self, address: str, names: list[str]) -> offload.Job:
        """Submit one worker job; calls made together go in one round trip, as one job array."""
        if self.shutting_down:
            raise RuntimeError(f"cluster {self.name} is shutting down: no new worker jobs")
        future: asyncio.Future[offload.Job] = asyncio.get_running_loop().create_future()
        self._pending.append((address, names, future))
        if self._flush is None:
            self._flush = asyncio.ensure_future(self._submit_pending())
        return await future

    async def _submit_pending(self) -> None:
        await asyncio.sleep(0.01)  # SpecCluster starts new workers together: let them all join this batch
        batch, self._pending, self._flush = self._pending, [], None
        by_address: dict[str, list[tuple[list[str], asyncio.Future[offload.Job]]]] = {}
        for address, names, future in batch:
            by_address.setdefault(address, []).append((names, future))
        for address, entries in by_address.items():
            spec = self.worker_spec(address, [names for names, _ in entries])
            try:
                # Few jobs go separately: SLURM starts a lone job at once, an array only at its next pass.
                many = len(entries) >= ARRAY_FROM
                jobs = await self.site.asubmit_many([spec] * len(entries), arrays=many)
            except BaseException as exc:
                for _, future in entries:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), job in zip(entries, jobs, strict=True):
                self.jobs.add(job)
                if not future.done():
                    future.set_result(job)

    async def cancel(self, job: offload.Job) -> None:
        """Cancel a job; calls made together go as one scheduler call."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._to_cancel.append((job, future))
        if self._cancel_flush is None:
            self._cancel_flush = asyncio.ensure_future(self._cancel_pending())
        await future

    async def _cancel_pending(self) -> None:
        await asyncio.sleep(0.01)
        batch, self._to_cancel, self._cancel_flush = self._to_cancel, [], None
        jobs = [job for job, _ in batch]
        try:
            await self.site.acancel(jobs)
            error = None
        except offload.OffloadError as exc:
            error = exc
        for job, future in batch:
            self.jobs.discard(job)
            if not future.done():
                future.set_exception(error) if error else future.set_result(None)

    def cancel_all_now(self) -> None:
        """Cancel every job still live, synchronously (interpreter exit, signals)."""
        self.shutting_down = True  # the cancelled jobs are not losses to replace
        jobs, self.jobs = list(self.jobs), set()
        if jobs:
            try:
                self.site.cancel(jobs, timeout=5)  # the scancel is what matters; do not hold up the exit
            except offload.OffloadError as exc:
                ids = " ".join(j.id for j in jobs)
                log.error("could not cancel the jobs of %s (%s); run: offload cancel --name %s  [%s]",
                          self.name, exc, self.job_name, ids)  # fmt: skip

    # -- losses -----------------------------------------------------------------------------------------

    def tell_once(self, key: str, message: str) -> None:
        if key not in self._told:
            self._told.add(key)
            log.warning(message)

    def allow_replacement(self, lifetime: float) -> bool:
        """Replace lost jobs, unless they keep dying right after they start (a broken image, say)."""
        self._quick_failures = self._quick_failures + 1 if lifetime < 30 else 0
        return self._quick_failures <= 3


class SiteScheduler(ProcessInterface):
    """The Dask scheduler as a job on the site, reached through a local port forward."""

    def __init__(self, *, shared: _Shared, **kwargs: Any) -> None:
        super().__init__()
        self.shared = shared
        self.job: offload.Job | None = None
        self.contact_address: str | None = None
        self.dashboard_port: int | None = None
        self._forwards: list[Any] = []
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        shared = self.shared
        # The first workers go in the same round trip as the scheduler and wait in the queue alongside it,
        # instead of queueing only once the scheduler runs; they learn its address from a file we write.
        initial = shared.initial_workers
        groups = [names for _, names in initial]
        specs = [shared.scheduler_spec()] + [shared.worker_spec("file", groups)] * len(initial)
        jobs = await shared.site.asubmit_many(specs, arrays=len(initial) >= ARRAY_FROM)
        self.job, workers = jobs[0], jobs[1:]
        shared.jobs.update(jobs)
        shared.presubmitted = {name: job for (name, _), job in zip(initial, workers, strict=True)}
        info = await asyncio.wait_for(self._scheduler_info(), shared.options["startup_timeout"])
        address = json.dumps({"address": info["address"]}).encode()
        await asyncio.gather(*(job.aput("scheduler.json", address) for job in workers))
        protocol, _, hostport = info["address"].partition("://")
        host, _, port = hostport.rpartition(":")
        forward = await shared.site.aforward(host.strip("[]"), int(port))
        self._forwards.append(forward)
        self.address = f"{protocol}://127.0.0.1:{forward.local_port}"
        self.contact_address = info["address"]  # what workers on the site connect to
        if info.get("dashboard"):
            # The dashboard listens on the node's loopback only (it has no login): reached through the job's relay.
            dashboard = await shared.site.aforward_job(self.job, int(info["dashboard"]))
            self._forwards.append(dashboard)
            self.dashboard_port = dashboard.local_port
        log.info("scheduler job %s runs at %s, reached at %s", self.job.id, self.contact_address, self.address)
        self._watcher = asyncio.ensure_future(self._watch())
        await super().start()

    async def _watch(self) -> None:
        """Say at once when the scheduler's job ends while the cluster still needs it, not after a timeout."""
        assert self.job is not None
        status = await self.job.finished()
        if self.status in (Status.closing, Status.closed) or self.shared.shutting_down:
            return
        # Its ports now refuse connections, which the client's reconnect loop takes as "not there" and gives up on.
        for forward in self._forwards:
            await forward.aclose()
        tail = await self.job.atail(10)
        message = "the Dask scheduler's job %s ended %s: cluster %s cannot work any more; close it and make a new one"
        log.error(message + ". Last lines of its log:\n%s", self.job.id, status.describe(), self.shared.name, tail)

    async def _scheduler_info(self) -> dict[str, Any]:
        assert self.job is not None
        job = self.job

        def show(status: offload.JobStatus) -> None:
            log.info("scheduler job %s: %s", job.id, status.describe())

        await job.await_state(offload.JobState.RUNNING, or_end=True, on_change=show)
        async for line in job.alogs(follow=True, interval=0.1):
            if line.startswith(f"{launcher.MARK}_SCHEDULER "):
                return json.loads(line.split(" ", 1)[1])
            if line.startswith(f"{launcher.MARK}_MISMATCH "):
                raise VersionMismatchError(describe_mismatch(json.loads(line.split(" ", 1)[1])))
        status = await self.job.astatus()
        tail = await self.job.atail()
        raise RuntimeError(f"the scheduler job {self.job.id} ended {status.describe()} before it started:\n{tail}")

    async def close(self) -> None:
        self.status = Status.closing
        if self._watcher is not None:
            self._watcher.cancel()
        for forward in self._forwards:
            await forward.aclose()
        if self.job is not None:
            await self.shared.cancel(self.job)
        await super().close()


class WorkerJob(ProcessInterface):
    """One job on the site running ``len(suffixes)`` Dask workers (one per GPU on GPU clusters)."""

    def __init__(self, scheduler: str, name: str, *, shared: _Shared, suffixes: list[str], **kwargs: Any) -> None:
        super().__init__(scheduler, name)
        self.scheduler_address = scheduler
        self.name = name
        self.shared = shared
        self.worker_names = [f"{name}{suffix}" for suffix in suffixes]
        self.job: offload.Job | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._started = 0.0

    async def start(self) -> None:
        self.job = self.shared.presubmitted.pop(self.name, None) or await self.shared.submit_worker_job(
            self.scheduler_address, self.worker_names
        )
        self._watcher = asyncio.ensure_future(self._watch())
        await super().start()

    async def _watch(self) -> None:
        assert self.job is not None
        await self.job.await_state(offload.JobState.RUNNING, or_end=True)
        # "keeps failing as it starts" counts from its start, not its submission: a queue wait is not a failure
        self._started = time.monotonic()
        status = await self.job.finished()
        if self.status != Status.running or self.shared.shutting_down:
            return  # we are closing it, or the whole cluster at exit
        self.shared.jobs.discard(self.job)
        cluster = self._cluster() if getattr(self, "_cluster", None) else None
        if cluster is None or cluster.status != Status.running:
            return
        tail = await self.job.atail(5)
        if "OFFLOAD_DASK_MISMATCH" in tail:
            self.shared.tell_once("mismatch", f"worker job {self.job.id} refused to start: {tail}")
            return
        if f"{launcher.MARK}_UNREACHABLE " in tail:
            info = json.loads(tail.split(f"{launcher.MARK}_UNREACHABLE ", 1)[1].splitlines()[0])
            local = self.shared.options["scheduler"] == "local"
            hint = (" Compute nodes of this site cannot reach this machine: keep the scheduler on the site "
                    "(scheduler='site', the default on remote sites)." if local else "")  # fmt: skip
            self.shared.tell_once(
                "unreachable",
                f"worker job {self.job.id} on {info['node']} cannot reach the scheduler at {info['address']} "
                f"({info['error']}); not starting more workers.{hint}",
            )
            if cluster.workers.get(self.name) is self:
                del cluster.workers[self.name]
                self.status = Status.closed
                cluster.worker_spec.pop(self.name, None)
            return
        replace = self.shared.allow_replacement(time.monotonic() - self._started)
        what = "replacing it" if replace else "not replacing it: jobs keep failing as they start"
        self.shared.tell_once(
            f"{status.state.value}:{status.reason}",
            f"worker job {self.job.id} ({self.name}) ended {status.describe()}; {what}. Last lines of its log:\n{tail}",
        )
        if cluster.workers.get(self.name) is self:
            del cluster.workers[self.name]
            self.status = Status.closed
            if not replace:
                cluster.worker_spec.pop(self.name, None)
            cluster._correct_state()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.job is not None and self.status == Status.running:
            self.status = Status.closing
            await self.shared.cancel(self.job)
        await super().close()


class OffloadCluster(SpecCluster):
    """A Dask cluster on an offload site: GPU or CPU workers as SLURM jobs in containers.

    Parameters (defaults from the Dask config section ``offload``; keyword arguments win):

    site: site profile name (None: ``$OFFLOAD_SITE``, the config's default, else ``local``); several (``"a,b"``,
        ``"@group"`` of the profile file, a list): the whole cluster goes to the one where a worker job starts
        first (``offload sites rank`` shows why), its scheduler and workers together
    gpus: GPU workers to start with, one per GPU, ``CUDA_VISIBLE_DEVICES`` pinned to one id each, advertising
        ``resources={"GPU": 1}``; packed ``gpus_per_node`` workers to a job
    n_workers: workers to start with (default: ``gpus``); ``scale()``/``adapt()`` change it later
    cores, memory: threads and memory of each worker
    processes: CPU workers per job (GPU clusters pack the site's ``gpus_per_node`` instead)
    walltime, image, partition, account, qos, job_extra, env: what every job gets
    secrets: environment every job gets as secrets (e.g. MLflow's credentials): never written into a script or
        a log
    reach: services on this machine's side the workers reach through offload's connection (compute nodes
        usually have no outbound network), e.g. ``{"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}``
    scheduler: ``"site"`` (a job on the site, reached by SSH port forward) or ``"local"`` (in this process)
    tls: per-cluster temporary TLS certificates (default True); or pass ``security=Security(...)``
    protocol: dask-jobqueue's; only ``"tls://"`` (or left out): the cluster's Dask traffic is TLS
    name: the cluster's name, which tags its jobs (``offload status --name``, ``offload cancel --name``)
    job_name: the name of its jobs instead (dask-jobqueue's ``job_name``)
    job_script_prologue, job_script_epilogue: shell lines run before the workers start (on the node) and after
        they end (in the job's container)
    silence_logs: the log level of the scheduler and the workers (``"error"``, ...; default: distributed's)
    """

    def __init__(
        self,
        site: str | list[str] | None = None,
        *,
        gpus: int | None = None,
        n_workers: int | None = None,
        cores: int | None = None,
        memory: str | None = None,
        processes: int | None = None,
        job_cpu: int | None = None,
        job_mem: str | None = None,
        walltime: str | None = None,
        image: str | None = None,
        scheduler: str | None = None,
        tls: bool | None = None,
        security: Security | None = None,
        name: str | None = None,
        env: dict[str, str] | None = None,
        secrets: dict[str, str] | None = None,
        reach: dict[str, str] | None = None,
        partition: str | None = None,
        queue: str | None = None,
        account: str | None = None,
        qos: str | None = None,
        job_extra_directives: list[str] | None = None,
        job_directives_skip: list[str] | None = None,
        job_script_prologue: list[str] | None = None,
        job_script_epilogue: list[str] | None = None,
        worker_extra_args: list[str] | None = None,
        death_timeout: float | str | None = None,
        local_directory: str | None = None,
        log_directory: str | None = None,
        interface: str | None = None,
        nanny: bool | None = None,
        scheduler_options: dict[str, Any] | None = None,
        shebang: str | None = None,
        python: str | None = None,
        job_name: str | None = None,
        protocol: str | None = None,
        silence_logs: str | int | bool | None = None,
        asynchronous: bool = False,
        loop: Any = None,
        **kwargs: Any,
    ) -> None:
        given = {k: v for k, v in locals().items()
                 if k not in ("self", "kwargs", "asynchronous", "loop", "security", "__class__")}  # fmt: skip
        named = given["site"] if given["site"] is not None else options.config("site")
        candidates = offload.load_sites(named).sites if named else [offload.load_site(None)]
        self._site = candidates[0]
        o = options.resolve(given, dict(kwargs), self._site.config.gpus_per_node)
        if len(candidates) > 1:  # several sites ("a,b", "@group"): the scheduler and every worker go to the one
            # where a worker job, as built for each site, starts first (one sinfo/qhost per site), so they never
            # talk across sites

            def worker_on(site: offload.Site) -> offload.JobSpec:
                there = options.resolve(dict(given), dict(kwargs), site.config.gpus_per_node)
                return _Shared(site, "probe", there, None).worker_spec("tls://check:1", [["check"]])

            self._site = offload.SiteGroup(candidates).choose(worker_on)
            o = options.resolve(given, dict(kwargs), self._site.config.gpus_per_node)
        if o["scheduler"] is None:
            o.given["scheduler"] = "local" if self._site.name == "local" else "site"
        if o["scheduler"] not in ("site", "local"):
            raise offload.ConfigError(f"scheduler must be 'site' or 'local', got {o['scheduler']!r}")
        name = o["name"] or f"dask-{token_hex(3)}"
        if security is None:
            security = temporary_security() if o["tls"] else None
        self._shared = _Shared(self._site, name, o, security)
        self._options = o
        # Refuse what the site cannot run (missing image, too many GPUs, bad walltime) before submitting.
        self._site.validate(self._shared.worker_spec("tls://check:1", [["check"]]))
        if o["scheduler"] == "site":
            self._site.validate(self._shared.scheduler_spec())
            scheduler_spec = {"cls": SiteScheduler, "options": {"shared": self._shared}}
        else:
            host = "127.0.0.1" if self._site.name == "local" else None
            scheduler_spec = {
                "cls": Scheduler,
                "options": {"protocol": "tls://" if security else "tcp://", "security": security, "host": host,
                            "dashboard_address": "127.0.0.1:0", **o.scheduler["scheduler_options"]},
            }  # fmt: skip
            scheduler_spec["options"].pop("dashboard_port", None)
        suffixes = [f"-{i}" for i in range(o.per_job)]
        worker = {"cls": WorkerJob, "options": {"shared": self._shared, "suffixes": suffixes}, "group": suffixes}
        self._per_job = o.per_job
        gpus = int(o.get("gpus", 0))
        n = o["n_workers"] if o["n_workers"] is not None else gpus
        self._prefix = name
        jobs = math.ceil(int(n) / self._per_job) if n else 0
        if jobs:
            self._check_workers_reach_scheduler()
        workers = {f"{name}-{i}": worker for i in range(jobs)}
        if o["scheduler"] == "site":
            self._shared.initial_workers = [(job, [job + suffix for suffix in suffixes]) for job in workers]
        _register_exit(self._shared)
        super().__init__(
            workers=workers, worker=worker, scheduler=scheduler_spec, security=security or Security(),
            name=name, asynchronous=asynchronous, loop=loop, silence_logs=o.log_level or False,
        )  # fmt: skip
        self._i = jobs

    # -- naming and scaling -----------------------------------------------------------------------------

    def _new_worker_name(self, worker_number: int) -> str:
        return f"{self._prefix}-{worker_number}"

    @property
    def site(self) -> offload.Site:
        return self._site

    @property
    def workers_per_job(self) -> int:
        return self._per_job

    def _check_workers_reach_scheduler(self) -> None:
        """Refuse workers that could never reach a scheduler in this process: say so now, not after a timeout.

        With ``scheduler="local"`` the workers connect to this machine. Jobs of the local site run on it; compute
        nodes of a remote site usually cannot open a connection to it (offload's design assumes they cannot,
        and its test site is built so), and offload has no way to learn otherwise before a worker tries."""
        if self._options["scheduler"] != "local" or _jobs_run_here(self._site):
            return
        raise offload.ConfigError(
            f"scheduler='local' runs the Dask scheduler in this process, but the workers would run on compute nodes "
            f"of site {self._site.name!r}, which cannot reach this machine on most sites: no worker would ever "
            "arrive. Use scheduler='site' (the default on a remote site): the scheduler runs as a job on the site "
            "and this process reaches it through offload's SSH connection."
        )

    def scale(self, n: int | None = None, jobs: int = 0, memory: str | None = None, cores: int | None = None):
        """Scale to ``n`` workers, or to ``jobs`` jobs (rounded up to whole jobs)."""
        if n is not None:
            jobs = max(jobs, math.ceil(n / self._per_job))
        if memory is not None:
            jobs = max(jobs, math.ceil(options.memory_bytes(memory) / (self._options.worker_memory * self._per_job)))
        if cores is not None:
            jobs = max(jobs, math.ceil(cores / (self._options.threads * self._per_job)))
        if jobs:
            self._check_workers_reach_scheduler()
        return super().scale(jobs)

    def adapt(self, *args: Any, minimum_jobs: int | None = None, maximum_jobs: int | None = None, **kwargs: Any):
        """Adaptive scaling in workers (``minimum``/``maximum``) or jobs (``minimum_jobs``/``maximum_jobs``)."""
        self._check_workers_reach_scheduler()
        if minimum_jobs is not None:
            kwargs["minimum"] = minimum_jobs * self._per_job
        if maximum_jobs is not None:
            kwargs["maximum"] = maximum_jobs * self._per_job
        # Retire whole jobs: a worker "<cluster>-<job>-<i>" belongs to job "<cluster>-<job>". A lambda that captures
        # nothing, so it travels to the scheduler by value (the image has no dask_offload to import).
        kwargs.setdefault("worker_key", lambda ws: ws.name.rsplit("-", 1)[0])
        return super().adapt(*args, **kwargs)

    def _threads_per_worker(self) -> int:
        return self._options.threads

    def _memory_per_worker(self) -> int:
        return self._options.worker_memory

    # -- inspection -------------------------------------------------------------------------------------

    def job_script(self) -> str:
        """The batch script of one worker job (TLS credentials are secrets: they are not in it)."""
        address = getattr(self.scheduler, "contact_address", None) or getattr(self.scheduler, "address", None)
        return self._site.job_script(self._shared.worker_spec(address or "<scheduler>", [["<worker>"]]))

    @property
    def jobs(self) -> list[offload.Job]:
        """The cluster's live jobs (scheduler first, if it runs on the site)."""
        scheduler_job = getattr(self.scheduler, "job", None)
        workers = [w.job for w in self.workers.values() if getattr(w, "job", None) is not None]
        return ([scheduler_job] if scheduler_job is not None else []) + workers

    async def _get_logs(self, cluster: bool = True, scheduler: bool = True, workers: Any = True) -> Logs:
        """Each worker's log (and the scheduler's), read from its job's output over the site's connection: also
        for workers that never reached the scheduler, or after it is gone. ``workers``: names or addresses."""
        logs = Logs()
        if cluster:
            logs["Cluster"] = Log("\n".join(line[1] for line in self._cluster_manager_logs))
        scheduler_job = getattr(self.scheduler, "job", None)
        if scheduler and scheduler_job is not None:
            logs["Scheduler"] = Log((await scheduler_job.aoutput()).decode("utf-8", "replace"))
        if workers:
            wanted = None if workers is True else set(workers)
            addresses = {info.get("name"): address for address, info in
                         (self.scheduler_info.get("workers") or {}).items()}  # fmt: skip
            for spec in list(self.workers.values()):
                job = getattr(spec, "job", None)
                if job is None:
                    continue
                lines = (await job.aoutput()).decode("utf-8", "replace").splitlines()
                for worker in spec.worker_names:
                    if wanted is not None and worker not in wanted and addresses.get(worker) not in wanted:
                        continue
                    own = [line for line in lines if f"[{worker}] " in line]
                    logs[worker] = Log("\n".join(own))
        return logs

    @property
    def dashboard_link(self) -> str:
        port = getattr(self.scheduler, "dashboard_port", None)
        if port:
            return f"http://127.0.0.1:{port}/status"
        return super().dashboard_link

    async def _close(self) -> None:
        try:
            await super()._close()
        except (OSError, CommClosedError) as exc:
            # The scheduler is gone already (its job ended): there is nobody to retire workers with.
            log.info("closing %s without its scheduler (%s)", self._shared.name, exc)
        finally:
            await asyncio.sleep(0)
            if self._shared.jobs:
                await self._site.acancel(list(self._shared.jobs))
                self._shared.jobs.clear()


def _jobs_run_here(site: offload.Site) -> bool:
    """Whether the site's jobs are processes of this machine (the local site), which reach its services."""
    return site.config.transport == "local" and site.config.scheduler == "local"


_live: weakref.WeakSet[_Shared] = weakref.WeakSet()


def _register_exit(shared: _Shared) -> None:
    """Cancel what a cluster left on the site at interpreter exit, SIGINT and SIGTERM."""
    _live.add(shared)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@atexit.register
def _cancel_everything() -> None:
    # Registered after offload's own exit hook, so it runs first, while offload's I/O thread still works.
    for shared in list(_live):
        shared.cancel_all_now()
