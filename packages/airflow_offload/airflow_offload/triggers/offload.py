"""``OffloadJobTrigger``: waits in the triggerer for an offload job to end, freeing the worker slot.

It only watches, it never submits (a trigger may run more than once, in any triggerer). While it waits it
brings the job's new output into the task's log every ``poll_interval`` (what the Kubernetes provider gets
by re-deferring, without holding a worker slot at all), and it says how far it got, so the resumed task logs
only what is left. All triggers of one triggerer share one SSH connection per site and one ``squeue`` per
round. A site that stops answering is retried with backoff while the job may still live; only after that the
task resumes with the error (and the operator cancels the job, or says why it did not). A job that ends within
:data:`RESUME_SETTLE` seconds of the deferral resumes the task only then (see there). A secret the task was
given is masked here too (trigger arguments are encrypted in Airflow's database). When a user kills the
deferred task (Airflow 3.3+ calls ``on_kill``), the job is cancelled.

Given a race (``placement``: its attempts, as ``offload.Placement.to_json`` hands them over, without the spec or
its secrets), it first claims the attempt that starts first and releases the others, then watches that one. It
still never submits. Run twice at once, or again after a triggerer died mid-claim, it claims no second attempt:
the decisions are on the site, and a watcher releases the other attempts before it claims one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import offload
from airflow_offload.hooks.offload import OffloadHook
from airflow_offload.version_compat import BaseTrigger, TriggerEvent, mask_secret

RETRIES = 12  # failed reads in a row before giving up (backoff from 2 s to 60 s: 4 to 8 minutes with jitter)
READ_RETRY = offload.RetryPolicy(first=2.0, factor=2.0, cap=60.0, attempts=RETRIES + 1)
# Seconds after the deferral before the event may resume the task. The worker that deferred reports its exit to
# the executor; when that report reaches the scheduler after the event has already queued the task again, Airflow
# (3.3.2, apache/airflow#67287 and #72716) takes it for a task killed externally and fails it. The report can take
# one supervisor wait to come (``[workers] min_heartbeat_interval``, 5 s by default): seen on the test site, a
# 3 s job resumed 1 s before its worker's exit was reported, and the task failed. Twice that wait covers it; only a
# job ending that soon after the deferral waits, and a trigger run again later (a triggerer restart) never does,
# nor one run in the process that deferred (``dag.test()`` runs its triggers inline: no executor, no race).
RESUME_SETTLE = 10.0


def this_process() -> str:
    """The process, as a trigger tells it apart from the deferring worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def deferral() -> dict[str, Any]:
    """The trigger arguments that say when and where a task deferred (:data:`RESUME_SETTLE`)."""
    return {"deferred_at": time.time(), "deferred_by": this_process()}


class OffloadJobTrigger(BaseTrigger):
    def __init__(
        self,
        job_id: str = "",
        jobdir: str = "",
        index: int | None = None,
        site: str | None = None,
        offload_conn_id: str | None = None,
        poll_interval: float | None = None,
        log_offset: int = 0,
        masks: list[str] | None = None,
        relay: bool = False,
        result_key: str | None = None,
        placement: str | None = None,
        deferred_at: float | None = None,
        deferred_by: str | None = None,
    ) -> None:
        super().__init__()
        if not job_id and placement is None:
            raise ValueError("an OffloadJobTrigger watches a job (job_id) or claims a placement's attempt (placement)")
        self.job_id = job_id
        self.jobdir = jobdir
        self.index = index
        self.site = site
        self.offload_conn_id = offload_conn_id
        self.poll_interval = poll_interval
        self.log_offset = log_offset
        self.masks = list(masks or [])
        self.relay = relay
        # @task.offload's key for its signed result: a secret like the masks (Airflow keeps trigger kwargs
        # encrypted), handed back in the event so the resuming worker can check the result before unpickling.
        self.result_key = result_key
        self.placement = placement
        self.deferred_at = deferred_at  # the worker's time.time() when it deferred (deferral())
        self.deferred_by = deferred_by  # and the worker (this_process())
        self._claimed: offload.Job | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            "airflow_offload.triggers.offload.OffloadJobTrigger",
            {
                "job_id": self.job_id,
                "jobdir": self.jobdir,
                "index": self.index,
                "site": self.site,
                "offload_conn_id": self.offload_conn_id,
                "poll_interval": self.poll_interval,
                "log_offset": self.log_offset,
                "masks": self.masks,
                "relay": self.relay,
                "result_key": self.result_key,
                "placement": self.placement,
                "deferred_at": self.deferred_at,
                "deferred_by": self.deferred_by,
            },
        )

    async def _job(self) -> offload.Job:
        site = await OffloadHook(offload_conn_id=self.offload_conn_id, site=self.site).aget_site()
        return await site.ajob(self.job_id, jobdir=self.jobdir, index=self.index)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        for value in self.masks:
            mask_secret(value)
        event: dict[str, Any] = {"job_id": self.job_id, "jobdir": self.jobdir, "index": self.index,
                                 "result_key": self.result_key, "site": self.site}  # fmt: skip
        offset, last, pending = self.log_offset, "", b""
        relay: asyncio.Future[offload.JobStatus] | None = None
        try:
            if self.placement is not None:
                job = self._claimed = await self._claim()
                event.update(job_id=job.id, jobdir=job.ref.jobdir, index=job.ref.index, site=job.site.name)
            else:
                job = await self._job()
            self.log.info("watching job %s on %s from the triggerer (pid %s)", job.id, job.site.name, os.getpid())
            if self.relay:  # the job reaches services on the worker's side: serve its relay while it runs
                relay = asyncio.ensure_future(job.site.arelay(job))

            def retrying(exc: Exception, pause: float) -> None:
                self.log.warning("cannot read job %s's output (%s); trying again in %.0f s", job.id, exc, pause)

            output = job.afollow(offset=offset, interval=self.poll_interval or job.site.config.poll_interval,
                                 retry=READ_RETRY, on_retry=retrying)  # fmt: skip
            async with contextlib.aclosing(output):
                async for chunk in output:
                    offset += len(chunk)
                    *lines, pending = (pending + chunk).split(b"\n")
                    for raw in lines:
                        line = raw.decode("utf-8", "replace")
                        self.log.info("%s", line)
                        last = line or last
            status = await job.finished()
            offset -= len(pending)  # an unfinished last line is the resumed task's to log
            event.update(state=status.state.value, exit_code=status.exit_code, reason=status.reason,
                         log_offset=offset, last_line=last)  # fmt: skip
        except offload.OffloadError as exc:
            event.update(error=str(exc), log_offset=offset, last_line=last)
        finally:
            if relay is not None:
                relay.cancel()
        await self._settle(event["job_id"])
        yield TriggerEvent(event)

    async def _settle(self, job_id: str) -> None:
        """Wait out what is left of :data:`RESUME_SETTLE` since the deferral (never longer: clocks of the worker
        and the triggerer may differ)."""
        if self.deferred_at is not None and self.deferred_by != this_process():
            left = min(RESUME_SETTLE, self.deferred_at + RESUME_SETTLE - time.time())
            if left > 0:
                self.log.info("job %s ended %.1f s after the deferral: resuming the task in %.1f s, once Airflow has "
                              "seen the deferring worker exit", job_id, RESUME_SETTLE - left, left)  # fmt: skip
                await asyncio.sleep(left)

    async def _claim(self) -> offload.Job:
        """The placement's attempt that starts first, claimed (the others released and cancelled). Stopped, this
        trigger leaves the attempts as they are: the trigger run again (in this triggerer or the next) goes on."""
        assert self.placement is not None
        placement = offload.Placement.from_json(self.placement, say=self.log.info)
        self.log.info("claiming the first attempt of placement %s to start, from the triggerer (pid %s)",
                      placement.id, os.getpid())  # fmt: skip
        return await placement.arun(abandon=False)

    async def on_kill(self) -> None:
        if self.placement is not None and self._claimed is None:
            self.log.info("Deferred task killed: releasing and cancelling the attempts of its placement")
            await offload.Placement.from_json(self.placement).acancel("the deferred task was killed")
            return
        job = self._claimed or await self._job()
        self.log.info("Deferred task killed: cancelling job %s", job.id)
        await job.acancel()
