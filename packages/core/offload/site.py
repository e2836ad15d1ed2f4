"""A :class:`Site`: one configured place to run jobs, with its connection, scheduler, runtime and poller.

The Site is the public facade: it wires the plugins, owns the per-process state (remade in a forked child) and
hands each service below it a :class:`~offload.context.SiteContext`, never itself: planning and submission
(:mod:`offload.submission`), the image cache (:mod:`offload.images`), the relays (:mod:`offload.reach`). Its
methods delegate to them, and wrap the job references they hand back in :class:`Job` handles.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from offload import _loop
from offload import reach as reach_mod
from offload.claims import Gate
from offload.config import SiteConfig
from offload.context import SiteContext
from offload.errors import ConfigError, JobNotFoundError, PluginError
from offload.estimates import ExpectedStart, StartEstimates
from offload.images import Images
from offload.jobs import Job, JobRef, JobState, JobStatus
from offload.plugins import Plugins, plugins
from offload.poller import Poller
from offload.profiles import load_profiles
from offload.records import JobRecord, JobRecords
from offload.runtimes.base import ContainerCommand, ContainerContext, Runtime
from offload.schedulers.base import NodeResources, Scheduler
from offload.spec import JobSpec, Mount
from offload.submission import Submitted, Submitter
from offload.transports.base import PortForward, Progress, Transport

log = logging.getLogger("offload")
T = TypeVar("T")


def _plugin_made(base: type[T], kind: str, name: str, made: object) -> T:
    """What a plugin's factory made, if it derives from offload's base class for its kind (which gives every
    method the core calls, with defaults); else a PluginError saying so, before any job is planned."""
    if not isinstance(made, base):
        raise PluginError(f"the {kind} plugin {name!r} made a {type(made).__name__}, which does not derive from "
                          f"offload.{base.__name__}: derive it, so it has every method offload calls")  # fmt: skip
    return made


class Site:
    """A place to run jobs. Get one with :func:`offload.load_site`."""

    def __init__(self, config: SiteConfig, *, registry: Plugins | None = None, records: JobRecords | None = None):
        registry = registry or plugins()
        self.config = config
        self.name = config.name
        self._hook = registry.manager.hook
        self._new_transport = registry.transport(config.transport).factory
        self._scheduler = _plugin_made(Scheduler, "scheduler", config.scheduler,
                                       registry.scheduler(config.scheduler).factory(config))  # fmt: skip
        self._runtime = _plugin_made(Runtime, "runtime", config.runtime,
                                     registry.runtime(config.runtime).factory(config.runtime_options))  # fmt: skip
        self._records = records or JobRecords()
        self._workdir: str | None = None
        self._job_host = _JobHost(self)
        self._closed = False
        self._start()
        _every_site.add(self)

    def _start(self) -> None:
        """The per-process state: the connection, the poller, the relays (made again in a forked child)."""
        self._transport = self._new_transport(self.config)
        self._poller = Poller(self._poll, self.config.poll_interval, self._ended, self._started)
        self._planned: dict[str, tuple[float, float]] = {}  # job id: (its plan, when it was submitted)
        # what the services below the facade may use of this site (they never see the Site itself)
        self._ctx = ctx = SiteContext(self.name, self.config, self._transport, self._scheduler, self._runtime,
                                      self._poller, self.aworkdir, self._records,
                                      self._hook)  # fmt: skip
        self._relays = reach_mod.Relays(ctx)
        self._images = Images(ctx)
        self._submitter = Submitter(ctx, self._images, self._relays)
        self._estimates = StartEstimates(ctx)

    def _after_fork(self) -> None:
        # The parent's connection and loop are not ours: drop them (never close them: that would speak on the
        # parent's socket), and the SQLite handle too (SQLite connections must not cross a fork).
        self._records = JobRecords(self._records.path)
        self._start()

    def __repr__(self) -> str:
        return f"<Site {self.name} {self._transport.description} {self.config.scheduler}/{self.config.runtime}>"

    @property
    def python(self) -> str:
        """The Python a payload should call: this very interpreter when jobs run on this machine without a
        container (the local site), else ``python3`` from the job's image."""
        local = self.config.transport == "local" and not self._runtime.runs_containers
        return sys.executable if local else "python3"

    @property
    def reserves_cpus(self) -> bool:
        """Whether a job's ``Resources.cpus`` are reserved for it here (SLURM: yes; Grid Engine, whose job gets
        one slot per node: no, and it refuses ``cpus`` above 1). Code that derives a CPU count the user did not
        give (Dask's workers per job) asks for it only where it is reserved."""
        return self._scheduler.reserves_cpus

    @property
    def job_host(self) -> _JobHost:
        """The narrow interface this site's :class:`Job` handles use (status, wait, cancel, files)."""
        return self._job_host

    @property
    def scheduler(self) -> Scheduler:
        """The site's scheduler plugin (how jobs are submitted, queried and cancelled there)."""
        return self._scheduler

    @property
    def runtime(self) -> Runtime:
        """The site's container runtime (how a command runs in an image there)."""
        return self._runtime

    @property
    def images(self) -> Images:
        """The site's image cache on its login node: pull, push, list, remove, prune."""
        return self._images

    @property
    def transport(self) -> Transport:
        """The site's connection (commands, files, port forwards), shared by everything in this process."""
        return self._transport

    # -- building scripts -------------------------------------------------------------------------------

    def validate(self, spec: JobSpec) -> None:
        """Raise :class:`ConfigError` if this site cannot run ``spec``; touches nothing on the site (an image
        the cache will pull or holds is checked as the cache path it will be)."""
        self._submitter.validate(spec)

    def job_script(self, spec: JobSpec) -> str:
        """The batch script ``spec`` would be submitted with (secrets not included: they never are; an image
        from the cache appears as where the cache will have it)."""
        return self._submitter.job_script(spec)

    def container_command(self, argv: Sequence[str], *, image: str, mounts: Sequence[Mount] = (),
                          env_names: Sequence[str] = (), workdir: str | None = None,
                          gpus: int = 0) -> ContainerCommand:  # fmt: skip
        """How this site's runtime runs ``argv`` in ``image``, for a payload that starts containers itself
        (``JobSpec(container=False)``: an interLink pod's driver runs each of its containers with its own image).
        Checked as a spec's container is (a :class:`ConfigError` says what the runtime cannot do); the variables
        named in ``env_names`` are passed in from the caller's environment."""
        ctx = ContainerContext(image=image, mounts=tuple(mounts), env_names=tuple(env_names), workdir=workdir,
                               gpus=gpus, scheduler_env=self._scheduler.job_env)  # fmt: skip
        self._runtime.validate(ctx)
        return ContainerCommand(prelude=tuple(self._runtime.prelude(ctx)),
                                argv=tuple(self._runtime.command(argv, ctx)))  # fmt: skip

    @_loop.on_loop
    async def aworkdir(self) -> str:
        """The site's work directory, absolute (``~`` resolved): job directories and offload's files live here."""
        if self._workdir is None:  # asked once, kept through a fork (the child's site has the same home)
            workdir = self.config.workdir
            if workdir == "~" or workdir.startswith("~/"):
                workdir = (await self._transport.home()) + workdir[1:]
            if not workdir.startswith("/"):
                raise ConfigError(f"site '{self.name}': workdir {workdir!r} must be absolute or start with '~/'")
            self._workdir = workdir
        return self._workdir

    workdir = _loop.blocking(aworkdir)

    def transport_run(self, argv: Sequence[str]) -> str:
        """Run one command on the site (the login node) and return its output; raises with its stderr."""
        return _loop.run(self._transport.run(list(argv))).stdout

    def bind_target(self, source: str) -> str:
        """Where a directory of the site is bound in this site's containers when no place is asked for."""
        return self._runtime.bind_target(source)

    # -- submitting -------------------------------------------------------------------------------------

    @_loop.on_loop
    async def asubmit(self, spec: JobSpec, *, gate: Gate | None = None) -> Job:
        """Submit one job and return its handle. ``gate``: submit it as one attempt of a job raced over several
        sites, which waits on its node for its claim before the payload (:mod:`offload.claims`; what
        :class:`offload.SiteGroup` does)."""
        return self._jobs(await self._submitter.submit_many([spec], gate=gate))[0]

    submit = _loop.blocking(asubmit)

    @_loop.on_loop
    async def asubmit_many(
        self, specs: Sequence[JobSpec], *, arrays: bool = True, array_parallelism: int | None = None
    ) -> list[Job]:
        """Submit many jobs in one round trip; identical specs go as one job array.

        Each job learns its position among identical specs from ``$OFFLOAD_TASK_INDEX``. More identical specs
        than the site's ``MaxArraySize`` go as several arrays. ``array_parallelism`` caps how many tasks of an
        array run at once (SLURM's ``--array=...%N``). ``arrays=False`` sends identical specs as separate jobs:
        SLURM tries a single job for scheduling the moment it is submitted, but an array only at its next
        scheduling pass (up to ``batch_sched_delay``, 3 s by default), so a handful of jobs that must start
        *now* start sooner without an array.

        All or nothing: if the site refuses one job (a limit, a full disk), the others that got in are
        cancelled and :class:`SubmissionError` says why. Interrupting it (Ctrl-C, task cancellation) never
        leaves a job running that nobody knows about: jobs that got in are cancelled.
        """
        return self._jobs(await self._submitter.submit_many(list(specs), arrays, array_parallelism))

    submit_many = _loop.blocking(asubmit_many)

    def _jobs(self, submitted: list[Submitted]) -> list[Job]:
        """Handles of the jobs the submitter sent: a handle names its Site, which no service below sees."""
        return [Job(self, ref, name=spec.name, spec=spec) for ref, spec in submitted]

    # -- relays -----------------------------------------------------------------------------------------

    @_loop.on_loop
    async def arelay(self, job: Job) -> JobStatus:
        """Serve ``job``'s reach relay from this process until the job ends (for a job another process
        submitted, e.g. with ``offload run --detach``); returns its final status."""
        await self._relays.serve_recorded(job.ref)
        return await self._poller.wait(job.ref)

    relay = _loop.blocking(arelay)

    # -- following jobs ---------------------------------------------------------------------------------

    async def _poll(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        return await self._scheduler.poll(self._transport, refs)

    def _ended(self, ref: JobRef, status: JobStatus) -> None:
        self._planned.pop(ref.id, None)  # ended before it was seen running: nothing to learn
        self._submitter.ended(ref, status)  # the poller is made before the submitter that keeps the job's ends

    @_loop.on_loop
    async def acancel(self, jobs: Sequence[Job], timeout: float = 60) -> None:
        """Cancel many jobs in one scheduler call; return once they ended (waiting at most ``timeout`` s)."""
        await self._submitter.cancel([job.ref for job in jobs], timeout)

    cancel = _loop.blocking(acancel)

    @_loop.on_loop
    async def ajob(self, job_id: str, *, jobdir: str | None = None, index: int | None = None) -> Job:
        """Reattach to a job by id: from this machine's records, the scheduler's queue, or, when given, the
        job's directory (``Job.ref.jobdir``) and array index, which any machine can use."""
        job_id = str(job_id)
        if jobdir is not None:  # the caller knows where the job lives (e.g. a trigger on another machine)
            return Job(self, JobRef(job_id, jobdir, index))
        record = self._records.get(self.name, job_id)
        if record is not None:
            ref = JobRef(job_id, record.jobdir, record.task_index)
            return Job(self, ref, name=record.name)
        ref = JobRef(job_id, "")
        status = (await self._scheduler.poll(self._transport, [ref])).get(job_id)
        if status is None or status.state is JobState.UNKNOWN:
            raise JobNotFoundError(
                f"no job {job_id!r} on site '{self.name}': it is neither in the scheduler's queue nor in this "
                "machine's job records ('offload status' lists them)"
            )
        self._poller.known(ref, status)
        return Job(self, ref)

    job = _loop.blocking(ajob)

    @_loop.on_loop
    async def afind(self, name: str) -> list[Job]:
        """Jobs on the site with this name, newest first, from the scheduler (queued and recently ended), so
        a process on any machine can find the job an earlier process submitted under a deterministic name."""
        refs = await self._scheduler.find(self._transport, name)
        if refs is None:  # the scheduler cannot say: this machine's records can
            refs = [JobRef(r.job_id, r.jobdir, r.task_index) for r in self._records.find(self.name, name, 1000)]
        return [Job(self, ref, name=name) for ref in refs]

    find = _loop.blocking(afind)

    @_loop.on_loop
    async def anodes(self) -> list[NodeResources]:
        """The site's nodes with their GPUs, CPUs and memory, total and in use (one scheduler call): what is free
        where, e.g. before asking for 8 GPUs."""
        return await self._scheduler.nodes(self._transport)

    nodes = _loop.blocking(anodes)

    @_loop.on_loop
    async def aexpected_start(self, spec: JobSpec) -> ExpectedStart:
        """When ``spec`` would start here if submitted now: the scheduler's own plan (SLURM's ``sbatch
        --test-only``, which submits nothing), corrected by the waits of this site's earlier jobs that offload
        saw start (:mod:`offload.estimates`); asked at most once a minute per job shape."""
        return await self._estimates.expected(spec)

    expected_start = _loop.blocking(aexpected_start)

    def learn_start(self, planned: float, waited: float) -> None:
        """One of this site's jobs started ``waited`` s after its submission where its scheduler planned
        ``planned``: what corrects the site's next plans."""
        self._estimates.learn(planned, waited)

    def learn_when_started(self, job: Job, planned: float) -> None:
        """Learn from ``job`` (submitted just now, planned to wait ``planned`` s) once it is seen running: a job
        placed by its plan teaches the site as a raced one does, if this process watches it start."""
        self._planned[job.id] = (planned, time.time())

    def _started(self, ref: JobRef) -> None:
        planned = self._planned.pop(ref.id, None)
        if planned is not None:
            self.learn_start(planned[0], time.time() - planned[1])

    def records(self, name: str | None = None, limit: int = 50) -> list[JobRecord]:
        """This machine's records of jobs on this site, newest first."""
        return self._records.find(self.name, name, limit)

    # -- an interactive shell inside a running job ------------------------------------------------------

    async def _shell(self, job: Job, argv: list[str]) -> int:
        record = self._records.get(self.name, job.id)
        image = (record.image if record else None) or self.config.image
        ctx = ContainerContext(image=image, jobdir=job.ref.jobdir or None)
        inner = self._runtime.command(argv, ctx)
        prelude = self._runtime.prelude(ctx)
        command = ["bash", "-c", "; ".join([*self.config.setup, *prelude, "exec " + shlex.join(inner)])]
        step = await self._scheduler.interactive(self._transport, job.ref, command, pty=sys.stdin.isatty())
        return await self._transport.interactive(step)

    def shell(self, job: Job, argv: Sequence[str] = ("bash", "-l")) -> int:
        """Run ``argv`` (default: a login shell) inside ``job``'s container on its node, attached to this
        terminal; returns its exit code. On SLURM this is a step of the job (``srun --overlap --pty``)."""
        status = job.status()
        if status.state is not JobState.RUNNING:
            raise ConfigError(f"job {job.id} is {status.describe()}: a shell needs a running job")
        return _loop.run(self._shell(job, list(argv)))

    # -- reaching services on the site -----------------------------------------------------------------

    @_loop.on_loop
    async def aforward(self, remote_host: str, remote_port: int, local_port: int = 0) -> Forward:
        """Forward 127.0.0.1:``local_port`` (0: any free port) to ``remote_host:remote_port`` as seen from the
        site's login node, over the site's connection; the port keeps listening through a reconnect."""
        return Forward(await self._transport.forward_local_port(remote_host, remote_port, local_port))

    forward = _loop.blocking(aforward)

    @_loop.on_loop
    async def aforward_job(self, job: Job, remote_port: int, local_port: int = 0) -> Forward:
        """Forward 127.0.0.1:``local_port`` to ``remote_port`` on the loopback of ``job``'s node, through the
        job's relay (``JobSpec(relay=True)``): for a service that listens on the node's 127.0.0.1 only."""
        if not self._ctx.relays_needed:  # the job runs here: its loopback is ours
            return Forward(await self._transport.forward_local_port("127.0.0.1", remote_port, local_port))
        if not self._relays.serving(job.id):
            await self._relays.serve_recorded(job.ref)
        return Forward(await self._relays.forward(job.ref, remote_port, local_port))

    forward_job = _loop.blocking(aforward_job)

    # -- lifetime ---------------------------------------------------------------------------------------

    async def _close(self) -> None:
        self._closed = True
        await self._relays.close()
        await self._transport.close()

    @_loop.on_loop
    async def aclose(self) -> None:
        """Close the site's connection (jobs keep running on the site; their reach relays stop). A shared site
        (:func:`load_site`) is not handed out again: the next call makes a new one."""
        _SITES.forget(self)
        await self._close()

    close = _loop.blocking(aclose)


class _JobHost:
    """What a Job may ask of its site (:class:`offload.jobs.JobHost`), and nothing more."""

    def __init__(self, site: Site) -> None:
        self._site = site

    @property
    def interval(self) -> float:
        return self._site.config.poll_interval

    async def status(self, ref: JobRef, refresh: bool) -> JobStatus:
        return await self._site._poller.status(ref, refresh=refresh)

    async def wait(self, ref: JobRef, states: Collection[JobState],
                   on_change: Callable[[JobStatus], object] | None) -> JobStatus:  # fmt: skip
        return await self._site._poller.wait(ref, states, on_change)

    async def cancel(self, refs: list[JobRef]) -> None:
        await self._site._submitter.cancel(refs)

    async def read(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        return await self._site._transport.read_file(path, offset, size)

    async def write(self, path: str, data: bytes, mode: int) -> None:
        await self._site._transport.write_file(path, data, mode=mode)

    async def upload(self, local: str, path: str, progress: Progress | None) -> None:
        await self._site._transport.put(local, path, progress=progress)

    async def download(self, path: str, local: str, progress: Progress | None) -> None:
        await self._site._transport.get(path, local, progress=progress)


class Forward:
    """A local port forward to a service on the site. Close it when done (closing twice is harmless)."""

    def __init__(self, inner: PortForward) -> None:
        self._inner = inner

    @property
    def local_port(self) -> int:
        return self._inner.local_port

    @_loop.on_loop
    async def aclose(self) -> None:
        """Stop listening on the local port and end the connections the forward carries."""
        await self._inner.close()

    close = _loop.blocking(aclose)


class _SiteCache:
    """The process's shared sites, one per config: what :func:`load_site` and :func:`shared_site` hand out to the
    CLI and every adapter (a hub's accounts, an Airflow worker's connections and triggers, Dask clusters), so
    one process keeps one connection and one poller per site and account, and closes them all at exit.

    A config is looked up by its values: the same profile gives the same Site; a changed profile (or another
    account on the same site) a new one, while the old one keeps serving whoever holds it until exit. A closed
    site is forgotten, never handed out again.
    """

    def __init__(self) -> None:
        self._sites: list[Site] = []  # few: one per config seen (SiteConfig holds dicts: no hash)
        self._lock = threading.Lock()  # sync callers come from any thread (Airflow, Dask, the CLI)

    def get(self, config: SiteConfig) -> Site:
        with self._lock:
            for site in self._sites:
                if site.config == config and not site._closed:
                    return site
            site = Site(config)
            self._sites.append(site)
            return site

    def forget(self, site: Site) -> None:
        with self._lock:
            self._sites = [s for s in self._sites if s is not site]

    async def close_all(self) -> None:
        """The exit hook (on offload's I/O loop, when it still runs; a loop that is gone left nothing to close):
        close every site this cache made, together. The interpreter is leaving: a site that fails to close is
        logged, never raised, and never keeps the others open."""
        with self._lock:
            sites, self._sites = self._sites, []
        results = await asyncio.gather(*(site._close() for site in sites), return_exceptions=True)
        for site, result in zip(sites, results, strict=True):
            if isinstance(result, BaseException):
                log.debug("closing site %s at exit: %r", site.name, result)

    def after_fork(self) -> None:
        self._lock = threading.Lock()  # a lock held by another thread at fork() stays held in the child


_SITES = _SiteCache()
_every_site: weakref.WeakSet[Site] = weakref.WeakSet()


def _reset_after_fork() -> None:
    _SITES.after_fork()
    for site in list(_every_site):
        site._after_fork()


_loop.at_fork(_reset_after_fork)
_loop.at_exit(_SITES.close_all)


def shared_site(config: SiteConfig) -> Site:
    """The process's one :class:`Site` for ``config`` (a profile, or one a caller built: an Airflow connection, a
    hub account's user and key): the same config gives the same Site, so its users share one connection and one
    poller. Every shared site is closed when the interpreter exits."""
    return _SITES.get(config)


def load_site(name: str | None = None) -> Site:
    """The site called ``name`` from the site profiles (None: ``$OFFLOAD_SITE``, the file's default, else
    the built-in ``local`` site). Sites are shared per process (:func:`shared_site`), so they share one
    connection; the profile is read at each call, and a changed one gives a new Site."""
    return _SITES.get(load_profiles().get(name))
