"""Planning and submitting one site's jobs: :class:`Submitter`, the service under the :class:`~offload.Site`
facade that turns specs into submitted jobs, and owns what the client keeps of them until they end.

Data of one submission flows one way::

    JobSpec + SiteConfig -> Runtime.command() -> argv -> BatchScript (+ scheduler directives)
    -> one submission program over the transport (mkdir, job.sh, secrets.env, sbatch) -> job ids -> JobRefs

Many jobs go in one round trip: :meth:`Submitter.submit_many` sends every script in one program
(:mod:`offload.submit`) on one SSH channel, and identical specs become one job array. It hands back job
references, not :class:`~offload.Job` handles: a handle names its Site, which only the facade knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets as _secrets
import sqlite3
import time
from typing import TYPE_CHECKING

from offload import _loop, jobfiles, reach_targets, submit
from offload import reach as reach_mod
from offload.errors import ConfigError
from offload.images import is_pull, is_pushed_name
from offload.jobs import JobRef, JobState, JobStatus
from offload.retry import RetryPolicy
from offload.runtimes.base import ContainerContext
from offload.script import BatchScript
from offload.spec import JobSpec
from offload.submit import Submission

if TYPE_CHECKING:
    from offload.claims import Gate
    from offload.context import SiteContext
    from offload.images import Images
    from offload.reach import Relays

log = logging.getLogger("offload")
# A locked SQLite file (another process writing) is tried 5 times in about 3 s before the error is logged.
_RECORD = RetryPolicy(first=0.2, factor=2.0, cap=1.6, attempts=5)

Submitted = tuple[JobRef, JobSpec]  # a job that got in, and the spec it runs (its image resolved)


class Submitter:
    """One site's planning and submission: the container context and batch script of a spec, the plan of a
    batch (arrays, job directories), the send, the records, the relays of jobs that reach back, cancelling,
    and the secrets a job that never started left behind. Made again, with the new context, in a forked child.
    """

    def __init__(self, ctx: SiteContext, images: Images, relays: Relays) -> None:
        self._ctx = ctx
        self._images = images  # resolves a batch's images (pulls once) before anything is sent
        self._relays = relays  # a job that reaches back is served from the moment it is submitted
        self._limits_seen: dict[str, int] | None = None
        self._secret_dirs: dict[str, set[str]] = {}  # job directories with secrets, and their jobs still running

    # -- building scripts -------------------------------------------------------------------------------

    def _context(self, spec: JobSpec, jobdir: str | None = None) -> ContainerContext:
        reach = [*spec.reach, *reach_targets.PROXY_NAMES] if spec.reach else []
        env_names = tuple(dict.fromkeys([*self._ctx.config.env, *spec.env, *spec.secrets, *reach]))
        return ContainerContext(
            image=spec.image or self._ctx.config.image,
            mounts=spec.mounts,
            env_names=env_names,
            workdir=spec.workdir,
            gpus=spec.resources.total_gpus,
            jobdir=jobdir,
            scheduler_env=self._ctx.scheduler.job_env,
        )

    def validate(self, spec: JobSpec) -> None:
        """Raise :class:`ConfigError` if the site cannot run ``spec``; touches nothing on the site (an image
        the cache will pull or holds is checked as the cache path it will be)."""
        if spec.container:
            self._ctx.runtime.validate(self._context(self._stand_in(spec), f"{self._ctx.config.workdir}/jobs/check"))
        self._ctx.scheduler.directives(spec, f"{self._ctx.config.workdir}/jobs/check", None)

    def _script(self, spec: JobSpec, jobdir: str, array_size: int | None, index: int | None = None, *,
                secrets: bool | None = None, index_offset: int = 0, parallelism: int | None = None,
                claim_wait: int = 0) -> str:  # fmt: skip
        ctx = self._context(spec, jobdir)
        site, scheduler, runtime = self._ctx.config, self._ctx.scheduler, self._ctx.runtime
        if spec.container:
            runtime.validate(ctx)
        res = spec.resources
        several = res.nodes > 1 or (res.tasks_per_node or 1) > 1
        relay = bool(spec.reach or spec.relay) and self._ctx.relays_needed
        script = BatchScript(
            shebang=spec.shebang or site.shebang,
            directives=scheduler.directives(spec, jobdir, array_size, parallelism),
            jobdir=jobdir,
            task_index=scheduler.task_index,
            index_value=None if index is None else str(index),
            index_offset=index_offset,
            secrets=bool(spec.secrets or spec.reach or relay) if secrets is None else secrets,
            setup=[*site.setup, *spec.prologue],
            env={**site.env, **spec.env},
            prelude=runtime.prelude(ctx) if spec.container else [],
            command=runtime.command(spec.command, ctx) if spec.container else list(spec.command),
            comment=f"offload job on site {self._ctx.name}",
            launcher=scheduler.launcher(res) if several else [],
            copy_env=dict(scheduler.copy_env) if several else {},
            first_node=scheduler.first_node if several else "",
            reach_source=reach_mod.SOURCE if relay else "",
            reach_key=reach_mod.base_key(jobdir) if relay else "",
            reach_container_python=runtime.command(["python3"], ctx) if relay else [],
            image_path=(runtime.image_path(ctx) or "") if spec.container else "",
            claim_wait=claim_wait,
        )
        self._ctx.hook.offload_job_script(script=script, spec=spec, site=site)
        return script.render()

    def job_script(self, spec: JobSpec) -> str:
        """The batch script ``spec`` would be submitted with (secrets not included: they never are; an image
        from the cache appears as where the cache will have it)."""
        return self._script(self._stand_in(spec), f"{self._ctx.config.workdir}/jobs/{_job_key(spec)}", None)

    def _stand_in(self, spec: JobSpec) -> JobSpec:
        """``spec`` with an image the cache will hold named as the cache's path, so a check or a shown script
        needs no pull (nor the site at all)."""
        site = self._ctx.config
        image = spec.image or site.image
        if not spec.container or not image or not (is_pushed_name(image) or (is_pull(image) and site.pull == "login")):
            return spec
        return dataclasses.replace(spec, image=f"{site.workdir}/images/(the cache's copy of {image.split('://')[-1]})")

    async def _jobs_dir(self) -> str:
        return f"{await self._ctx.workdir()}/jobs"

    # -- submitting -------------------------------------------------------------------------------------

    async def submit_many(
        self, specs: list[JobSpec], arrays: bool = True, array_parallelism: int | None = None, gate: Gate | None = None
    ) -> list[Submitted]:
        """Submit ``specs`` in one round trip, all or nothing (see :meth:`offload.Site.asubmit_many`): the jobs
        that got in, in the order of ``specs``. A cancelled caller's jobs are cancelled once they are known.
        ``gate``: one spec, submitted as a raced attempt in the gate's directory (:mod:`offload.claims`)."""
        if not specs:
            return []
        if gate is not None and len(specs) != 1:
            raise ConfigError("a raced attempt is one job: submit it alone")
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
        task = asyncio.ensure_future(self._send_and_record(specs, arrays, array_parallelism, gate))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            _loop.keep(self._cancel_when_done(task))
            raise

    async def _cancel_when_done(self, task: asyncio.Future[list[Submitted]]) -> None:
        try:
            jobs = await task
        except asyncio.CancelledError:
            log.warning("an interrupted submission to %s was stopped before its end: the site's submission "
                        "program cancels the jobs it sent once it finds the connection gone (if in doubt, look in "
                        "the queue for jobs under %s)", self._ctx.name, self._ctx.config.workdir)  # fmt: skip
            raise
        except Exception as exc:  # it failed by itself, and said what became of the jobs that got in
            log.warning("the interrupted submission failed: %s", exc)
            return
        log.warning("submission interrupted: cancelling the %d job(s) it had submitted", len(jobs))
        try:
            await self.cancel([ref for ref, _ in jobs], timeout=30)
        except Exception as exc:
            log.warning("cancelling them failed (%s): cancel %s by hand", exc, " ".join(ref.id for ref, _ in jobs))

    async def _plan(
        self, specs: list[JobSpec], arrays: bool, parallelism: int | None, gate: Gate | None = None
    ) -> list[tuple[Submission, list[int]]]:
        if gate is not None:  # one job, in the directory its placement recorded, waiting for its claim
            return [(self._submission(specs[0], gate.jobdir, None, None, claim_wait=gate.wait), [0])]
        jobs_dir = await self._jobs_dir()
        scheduler = self._ctx.scheduler
        groups: dict[JobSpec, list[int]] = {}
        for index, spec in enumerate(specs):
            groups.setdefault(spec, []).append(index)
        if arrays and scheduler.supports_arrays and any(len(i) > 1 for i in groups.values()):
            max_array = (await self._limits()).get("max_array_size") or 1001
        planned: list[tuple[Submission, list[int]]] = []
        for spec, indices in groups.items():
            if arrays and scheduler.supports_arrays and len(indices) > 1:
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
                    index_offset: int = 0, parallelism: int | None = None,
                    claim_wait: int = 0) -> Submission:  # fmt: skip
        secrets, files = dict(spec.secrets), {}
        if (spec.reach or spec.relay) and self._ctx.relays_needed:
            targets = reach_targets.targets_of(dict(spec.reach))
            secrets["OFFLOAD_REACH"] = reach_targets.node_targets(targets)  # URLs may hold credentials
            files[jobfiles.REACH] = reach_targets.client_targets(targets)  # what any client needs to serve the relay
        elif spec.reach:
            secrets.update(spec.reach)  # the job runs here: it reaches the services directly
        files.update(spec.files)
        image = self._ctx.runtime.image_path(self._context(spec, jobdir)) if spec.container else None
        script = self._script(spec, jobdir, array_size, index, secrets=bool(secrets), index_offset=index_offset,
                              parallelism=parallelism, claim_wait=claim_wait)  # fmt: skip
        return Submission(spec, jobdir, script, array_size, secrets=secrets, files=files,
                          paths=[image] if image else [])  # fmt: skip

    async def _limits(self) -> dict[str, int]:
        if self._limits_seen is None:
            self._limits_seen = await self._ctx.scheduler.limits(self._ctx.transport)
        return self._limits_seen

    async def _send_and_record(
        self, specs: list[JobSpec], arrays: bool, parallelism: int | None, gate: Gate | None
    ) -> list[Submitted]:
        ctx = self._ctx
        planned = await self._plan(specs, arrays, parallelism, gate)
        jobs_dir = await self._jobs_dir()
        submissions = [sub for sub, _ in planned]
        await submit.send(ctx.transport, ctx.scheduler, ctx.name, submissions, jobs_dir, ctx.config.max_sessions)
        jobs: list[Submitted | None] = [None] * len(specs)
        rows = []
        for sub, indices in planned:
            for task, (index, job_id) in enumerate(zip(indices, sub.ids, strict=True)):
                ref = JobRef(job_id, sub.jobdir, task if sub.array_size else None)
                ctx.poller.known(ref, JobStatus(JobState.PENDING, "submitted"))
                jobs[index] = (ref, sub.spec)
                rows.append((ctx.name, job_id, sub.spec.name, sub.jobdir, ref.index, list(sub.spec.command),
                             sub.spec.image or ctx.config.image))  # fmt: skip
            if sub.secrets:
                self._secret_dirs[sub.jobdir] = set(sub.ids)
            if (sub.spec.reach or sub.spec.relay) and ctx.relays_needed:
                targets = [(t.host, t.port) for t in reach_targets.targets_of(dict(sub.spec.reach))]
                for index in indices:
                    job = jobs[index]
                    assert job is not None
                    self._relays.serve(job[0], targets)
        await self._record(rows)
        return [job for job in jobs if job is not None]

    async def _record(self, rows: list) -> None:
        """Record submitted jobs; a locked or broken database delays that, but never loses the jobs."""
        records = self._ctx.records

        async def add() -> None:
            records.add(rows)

        try:
            await _RECORD.call(add, lambda exc: isinstance(exc, sqlite3.Error))
        except sqlite3.Error as exc:
            ids = " ".join(row[1] for row in rows)
            log.error("could not record %d submitted job(s) in %s (%s); they run on %s: %s", len(rows),
                      records.path, exc, self._ctx.name, ids)  # fmt: skip

    # -- taking jobs back, and their end ----------------------------------------------------------------

    async def cancel(self, refs: list[JobRef], timeout: float = 60) -> None:
        """Cancel ``refs`` in one scheduler call, and return once the scheduler says they ended."""
        if not refs:
            return
        ctx = self._ctx
        await ctx.scheduler.cancel(ctx.transport, refs)
        await asyncio.gather(*(ctx.poller.status(ref, refresh=True) for ref in refs))
        try:
            await asyncio.wait_for(asyncio.gather(*(ctx.poller.wait(ref) for ref in refs)), timeout)
        except TimeoutError:
            log.warning("cancelled %d job(s) on %s, but they have not ended after %s s", len(refs), ctx.name, timeout)

    def ended(self, ref: JobRef, status: JobStatus) -> None:
        """What the client does when the poller sees a job end: record its end, stop its relay, and remove the
        secrets of a job directory none of whose jobs is left (a job that never started did not remove them)."""
        ctx = self._ctx
        with contextlib.suppress(sqlite3.Error):  # a record that cannot be written must not stop the poller
            ctx.records.update(ctx.name, ref.id, status.state.value, status.reason, status.exit_code)
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
                    ctx.transport.run(["sh", "-c", script, "sh", ref.jobdir], check=False, timeout=60)
                )
                task.add_done_callback(lambda t: t.cancelled() or t.exception())


def _job_key(spec: JobSpec) -> str:
    # 64 random bits: thousands of job directories made in the same second never collide
    return f"{spec.name or 'job'}-{time.strftime('%Y%m%d-%H%M%S')}-{_secrets.token_hex(8)}"
