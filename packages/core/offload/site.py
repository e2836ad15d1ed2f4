"""A :class:`Site`: one configured place to run jobs, with its connection, scheduler, runtime and poller.

Data of one submission flows one way::

    JobSpec + SiteConfig -> Runtime.command() -> argv -> BatchScript (+ scheduler directives)
    -> one submission program over the transport (mkdir, job.sh, secrets.env, sbatch) -> job ids -> Job

Many jobs go in one round trip: ``submit_many`` sends every script in one program on one SSH channel, and
identical specs become one job array.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets as _secrets
import shlex
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

from offload import _loop, jobfiles, reach_targets, submit
from offload import reach as reach_mod
from offload.config import SiteConfig
from offload.context import SiteContext
from offload.errors import ConfigError, JobNotFoundError, PluginError
from offload.images import Images, is_pull, is_pushed_name
from offload.jobs import Job, JobRef, JobState, JobStatus
from offload.plugins import Plugins, plugins
from offload.poller import Poller
from offload.profiles import load_profiles
from offload.records import JobRecord, JobRecords
from offload.retry import RetryPolicy
from offload.runtimes.base import ContainerCommand, ContainerContext, Runtime
from offload.schedulers.base import NodeResources, Scheduler
from offload.script import BatchScript
from offload.spec import JobSpec, Mount
from offload.submit import Submission
from offload.transports.base import PortForward, Progress, Transport

log = logging.getLogger("offload")
T = TypeVar("T")
# A locked SQLite file (another process writing) is tried 5 times in about 3 s before the error is logged.
_RECORD = RetryPolicy(first=0.2, factor=2.0, cap=1.6, attempts=5)


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
        # Jobs on another machine reach this one's services through a relay; local jobs reach them directly.
        self._relays_needed = not self._scheduler.runs_on_client
        self._workdir: str | None = None
        self._job_host = _JobHost(self)
        self._closed = False
        self._start()
        _every_site.add(self)

    def _start(self) -> None:
        """The per-process state: the connection, the poller, the relays (made again in a forked child)."""
        self._transport = self._new_transport(self.config)
        self._poller = Poller(self._poll, self.config.poll_interval, self._ended)
        # what the services below the facade may use of this site (they never see the Site itself)
        ctx = SiteContext(self.name, self.config, self._transport, self._scheduler, self._runtime, self._poller,
                          self.aworkdir, self._relay_step_argv)  # fmt: skip
        self._relays = reach_mod.Relays(ctx)
        self._images = Images(ctx)
        self._site_limits: dict[str, int] | None = None
        self._secret_dirs: dict[str, set[str]] = {}

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

    def _context(self, spec: JobSpec, jobdir: str | None = None) -> ContainerContext:
        reach = [*spec.reach, *reach_targets.PROXY_NAMES] if spec.reach else []
        env_names = tuple(dict.fromkeys([*self.config.env, *spec.env, *spec.secrets, *reach]))
        return ContainerContext(
            image=spec.image or self.config.image,
            mounts=spec.mounts,
            env_names=env_names,
            workdir=spec.workdir,
            gpus=spec.resources.total_gpus,
            jobdir=jobdir,
            scheduler_env=self._scheduler.job_env,
        )

    def validate(self, spec: JobSpec) -> None:
        """Raise :class:`ConfigError` if this site cannot run ``spec``; touches nothing on the site (an image
        the cache will pull or holds is checked as the cache path it will be)."""
        if spec.container:
            self._runtime.validate(self._context(self._stand_in(spec), f"{self.config.workdir}/jobs/check"))
        self._scheduler.directives(spec, f"{self.config.workdir}/jobs/check", None)

    def _script(self, spec: JobSpec, jobdir: str, array_size: int | None, index: int | None = None, *,
                secrets: bool | None = None, index_offset: int = 0, parallelism: int | None = None) -> str:  # fmt: skip
        ctx = self._context(spec, jobdir)
        if spec.container:
            self._runtime.validate(ctx)
        res = spec.resources
        several = res.nodes > 1 or (res.tasks_per_node or 1) > 1
        relay = bool(spec.reach or spec.relay) and self._relays_needed
        script = BatchScript(
            shebang=spec.shebang or self.config.shebang,
            directives=self._scheduler.directives(spec, jobdir, array_size, parallelism),
            jobdir=jobdir,
            task_index=self._scheduler.task_index,
            index_value=None if index is None else str(index),
            index_offset=index_offset,
            secrets=bool(spec.secrets or spec.reach or relay) if secrets is None else secrets,
            setup=[*self.config.setup, *spec.prologue],
            env={**self.config.env, **spec.env},
            prelude=self._runtime.prelude(ctx) if spec.container else [],
            command=self._runtime.command(spec.command, ctx) if spec.container else list(spec.command),
            comment=f"offload job on site {self.name}",
            launcher=self._scheduler.launcher(res) if several else [],
            copy_env=dict(self._scheduler.copy_env) if several else {},
            first_node=self._scheduler.first_node if several else "",
            reach_source=reach_mod.SOURCE if relay else "",
            reach_key=reach_mod.base_key(jobdir) if relay else "",
            reach_container_python=self._runtime.command(["python3"], ctx) if relay else [],
            image_path=(self._runtime.image_path(ctx) or "") if spec.container else "",
        )
        self._hook.offload_job_script(script=script, spec=spec, site=self.config)
        return script.render()

    def job_script(self, spec: JobSpec) -> str:
        """The batch script ``spec`` would be submitted with (secrets not included: they never are; an image
        from the cache appears as where the cache will have it)."""
        return self._script(self._stand_in(spec), f"{self.config.workdir}/jobs/{_job_key(spec)}", None)

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

    def _stand_in(self, spec: JobSpec) -> JobSpec:
        image = spec.image or self.config.image
        if (
            not spec.container
            or not image
            or not (is_pushed_name(image) or (is_pull(image) and self.config.pull == "login"))
        ):
            return spec
        return dataclasses.replace(
            spec, image=f"{self.config.workdir}/images/(the cache's copy of {image.split('://')[-1]})"
        )

    async def _jobs_dir(self) -> str:
        if self._workdir is None:
            workdir = self.config.workdir
            if workdir == "~" or workdir.startswith("~/"):
                workdir = (await self._transport.home()) + workdir[1:]
            if not workdir.startswith("/"):
                raise ConfigError(f"site '{self.name}': workdir {workdir!r} must be absolute or start with '~/'")
            self._workdir = workdir
        return f"{self._workdir}/jobs"

    @_loop.on_loop
    async def aworkdir(self) -> str:
        """The site's work directory, absolute (``~`` resolved): job directories and offload's files live here."""
        return (await self._jobs_dir()).removesuffix("/jobs")

    workdir = _loop.blocking(aworkdir)

    def transport_run(self, argv: Sequence[str]) -> str:
        """Run one command on the site (the login node) and return its output; raises with its stderr."""
        return _loop.run(self._transport.run(list(argv))).stdout

    def bind_target(self, source: str) -> str:
        """Where a directory of the site is bound in this site's containers when no place is asked for."""
        return self._runtime.bind_target(source)

    # -- submitting -------------------------------------------------------------------------------------

    @_loop.on_loop
    async def asubmit(self, spec: JobSpec) -> Job:
        """Submit one job and return its handle."""
        return (await self._submit_many([spec]))[0]

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
        return await self._submit_many(list(specs), arrays, array_parallelism)

    submit_many = _loop.blocking(asubmit_many)

    async def _submit_many(
        self, specs: list[JobSpec], arrays: bool = True, array_parallelism: int | None = None
    ) -> list[Job]:
        if not specs:
            return []
        for spec in specs:
            if not isinstance(spec, JobSpec):
                raise ConfigError(f"submit takes offload.JobSpec objects, got {type(spec).__name__}")
            self.validate(spec)  # every spec, before anything reaches the site
        if array_parallelism is not None and (not isinstance(array_parallelism, int) or array_parallelism < 1):
            raise ConfigError(f"array_parallelism must be a whole number of at least 1, got {array_parallelism!r}")
        # Registry images are pulled once on the login node (if not cached), and pushed names found, before the
        # jobs go: a missing tag fails here, with nothing queued.
        specs = await self._images.aresolve_specs(specs)
        # The send and the record go together, whatever happens to the caller meanwhile: a cancelled caller's
        # jobs are cancelled once they are known, never left running unrecorded.
        task = asyncio.ensure_future(self._send_and_record(specs, arrays, array_parallelism))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            _loop.keep(self._cancel_when_done(task))
            raise

    async def _cancel_when_done(self, task: asyncio.Future[list[Job]]) -> None:
        try:
            jobs = await task
        except asyncio.CancelledError:
            log.warning("an interrupted submission to %s was stopped before its end: look in the site's queue for "
                        "jobs under %s and cancel them", self.name, self.config.workdir)  # fmt: skip
            raise
        except Exception as exc:  # it failed by itself, and said what became of the jobs that got in
            log.warning("the interrupted submission failed: %s", exc)
            return
        log.warning("submission interrupted: cancelling the %d job(s) it had submitted", len(jobs))
        try:
            await self._cancel([job.ref for job in jobs], timeout=30)
        except Exception as exc:
            log.warning("cancelling them failed (%s): cancel %s by hand", exc, " ".join(j.id for j in jobs))

    async def _plan(
        self, specs: list[JobSpec], arrays: bool, parallelism: int | None
    ) -> list[tuple[Submission, list[int]]]:
        jobs_dir = await self._jobs_dir()
        groups: dict[JobSpec, list[int]] = {}
        for index, spec in enumerate(specs):
            groups.setdefault(spec, []).append(index)
        if arrays and self._scheduler.supports_arrays and any(len(i) > 1 for i in groups.values()):
            max_array = (await self._limits()).get("max_array_size") or 1001
        planned: list[tuple[Submission, list[int]]] = []
        for spec, indices in groups.items():
            if arrays and self._scheduler.supports_arrays and len(indices) > 1:
                for start in range(0, len(indices), max_array):  # several arrays beyond MaxArraySize
                    chunk = indices[start : start + max_array]
                    planned.append((self._submission(spec, f"{jobs_dir}/{_job_key(spec)}", len(chunk), None,
                                                     start, parallelism), chunk))  # fmt: skip
                continue
            for position, index in enumerate(indices):
                # No arrays here: one job per task, each told its index like an array task would be.
                planned.append((self._submission(spec, f"{jobs_dir}/{_job_key(spec)}", None,
                                                 position if len(indices) > 1 else None), [index]))  # fmt: skip
        return planned

    def _submission(self, spec: JobSpec, jobdir: str, array_size: int | None, index: int | None,
                    index_offset: int = 0, parallelism: int | None = None) -> Submission:  # fmt: skip
        secrets, files = dict(spec.secrets), {}
        if (spec.reach or spec.relay) and self._relays_needed:
            targets = reach_targets.targets_of(dict(spec.reach))
            secrets["OFFLOAD_REACH"] = reach_targets.node_targets(targets)  # URLs may hold credentials
            files[jobfiles.REACH] = reach_targets.client_targets(targets)  # what any client needs to serve the relay
        elif spec.reach:
            secrets.update(spec.reach)  # the job runs here: it reaches the services directly
        files.update(spec.files)
        image = self._runtime.image_path(self._context(spec, jobdir)) if spec.container else None
        script = self._script(spec, jobdir, array_size, index, secrets=bool(secrets), index_offset=index_offset,
                              parallelism=parallelism)  # fmt: skip
        return Submission(spec, jobdir, script, array_size, secrets=secrets, files=files,
                          paths=[image] if image else [])  # fmt: skip

    async def _limits(self) -> dict[str, int]:
        if self._site_limits is None:
            self._site_limits = await self._scheduler.limits(self._transport)
        return self._site_limits

    async def _send_and_record(self, specs: list[JobSpec], arrays: bool, parallelism: int | None) -> list[Job]:
        planned = await self._plan(specs, arrays, parallelism)
        jobs_dir = await self._jobs_dir()
        submissions = [sub for sub, _ in planned]
        await submit.send(self._transport, self._scheduler, self.name, submissions, jobs_dir,
                          self.config.max_sessions)  # fmt: skip
        jobs: list[Job | None] = [None] * len(specs)
        rows = []
        for sub, indices in planned:
            for task, (index, job_id) in enumerate(zip(indices, sub.ids, strict=True)):
                ref = JobRef(job_id, sub.jobdir, task if sub.array_size else None)
                job = Job(self, ref, name=sub.spec.name, spec=sub.spec)
                self._poller.known(ref, JobStatus(JobState.PENDING, "submitted"))
                jobs[index] = job
                rows.append((self.name, job_id, sub.spec.name, sub.jobdir, ref.index, list(sub.spec.command),
                             sub.spec.image or self.config.image))  # fmt: skip
            if sub.secrets:
                self._secret_dirs[sub.jobdir] = set(sub.ids)
            if (sub.spec.reach or sub.spec.relay) and self._relays_needed:
                targets = [(t.host, t.port) for t in reach_targets.targets_of(dict(sub.spec.reach))]
                for index in indices:
                    job = jobs[index]
                    assert job is not None
                    self._relays.serve(job.ref, targets)
        await self._record(rows)
        return [job for job in jobs if job is not None]

    async def _record(self, rows: list) -> None:
        """Record submitted jobs; a locked or broken database delays that, but never loses the jobs."""

        async def add() -> None:
            self._records.add(rows)

        try:
            await _RECORD.call(add, lambda exc: isinstance(exc, sqlite3.Error))
        except sqlite3.Error as exc:
            ids = " ".join(row[1] for row in rows)
            log.error("could not record %d submitted job(s) in %s (%s); they run on %s: %s", len(rows),
                      self._records.path, exc, self.name, ids)  # fmt: skip

    def _relay_step_argv(self, ref: JobRef) -> list[str]:
        """The carrier: the relay program in ``carry`` mode, with the node's python3 or else the image's."""
        carrier = ["python3", "-c", reach_mod.SOURCE, "carry", reach_mod.relay_key(ref)]
        record = self._records.get(self.name, ref.id)
        ctx = ContainerContext(image=(record.image if record else None) or self.config.image, jobdir=ref.jobdir)
        inner = self._runtime.command(carrier, ctx)
        script = (f"if command -v python3 >/dev/null 2>&1; then exec {shlex.join(carrier)}; "
                  f"else exec {shlex.join(inner)}; fi")  # fmt: skip
        return ["bash", "-c", script]

    async def _serve_relay(self, job: Job) -> None:
        raw = await self._transport.read_file(job.ref.paths.reach)
        if not raw:
            raise ConfigError(f"job {job.id} on {self.name} runs no relay (it was submitted without reach or relay)")
        self._relays.serve(job.ref, [(t["host"], int(t["port"])) for t in json.loads(raw)])

    @_loop.on_loop
    async def arelay(self, job: Job) -> JobStatus:
        """Serve ``job``'s reach relay from this process until the job ends (for a job another process
        submitted, e.g. with ``offload run --detach``); returns its final status."""
        await self._serve_relay(job)
        return await self._poller.wait(job.ref)

    relay = _loop.blocking(arelay)

    # -- following jobs ---------------------------------------------------------------------------------

    async def _poll(self, refs: list[JobRef]) -> dict[str, JobStatus]:
        return await self._scheduler.poll(self._transport, refs)

    def _ended(self, ref: JobRef, status: JobStatus) -> None:
        with contextlib.suppress(sqlite3.Error):  # a record that cannot be written must not stop the poller
            self._records.update(self.name, ref.id, status.state.value, status.reason, status.exit_code)
        self._relays.stop(ref.id)
        ids = self._secret_dirs.get(ref.jobdir)
        if ids is not None:
            ids.discard(ref.id)
            if not ids:
                # The second line of defence: the job removed its secrets when it started; a job that never
                # started (cancelled while pending) did not, so the client that sees it end does.
                del self._secret_dirs[ref.jobdir]
                script = f'rm -f "$1"/{jobfiles.SECRETS} "$1"/{jobfiles.SECRETS}.*'
                task = asyncio.get_running_loop().create_task(
                    self._transport.run(["sh", "-c", script, "sh", ref.jobdir], check=False, timeout=60)
                )
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _cancel(self, refs: list[JobRef], timeout: float = 60) -> None:
        """Cancel ``refs`` in one scheduler call, and return once the scheduler says they ended."""
        if not refs:
            return
        await self._scheduler.cancel(self._transport, refs)
        await asyncio.gather(*(self._poller.status(ref, refresh=True) for ref in refs))
        try:
            await asyncio.wait_for(asyncio.gather(*(self._poller.wait(ref) for ref in refs)), timeout)
        except TimeoutError:
            log.warning("cancelled %d job(s) on %s, but they have not ended after %s s", len(refs), self.name, timeout)

    @_loop.on_loop
    async def acancel(self, jobs: Sequence[Job], timeout: float = 60) -> None:
        """Cancel many jobs in one scheduler call; return once they ended (waiting at most ``timeout`` s)."""
        await self._cancel([job.ref for job in jobs], timeout)

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
        if not self._relays_needed:  # the job runs here: its loopback is ours
            return Forward(await self._transport.forward_local_port("127.0.0.1", remote_port, local_port))
        if job.id not in self._relays._tasks:
            await self._serve_relay(job)
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
        await self._site._cancel(refs)

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


def _job_key(spec: JobSpec) -> str:
    # 64 random bits: thousands of job directories made in the same second never collide
    return f"{spec.name or 'job'}-{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(8)}"


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
