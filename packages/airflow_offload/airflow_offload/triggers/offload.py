"""``OffloadJobTrigger``: waits in the triggerer for an offload job to end, freeing the worker slot.

It only watches, it never submits (a trigger may run more than once, in any triggerer). While it waits it
brings the job's new output into the task's log every ``poll_interval`` (what the Kubernetes provider gets
by re-deferring, without holding a worker slot at all), and it says how far it got, so the resumed task logs
only what is left. All triggers of one triggerer share one SSH connection per site and one ``squeue`` per
round. A site that stops answering is retried with backoff while the job may still live; only after that the
task resumes with the error (and the operator cancels the job, or says why it did not). A secret the task was
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
from collections.abc import AsyncIterator
from typing import Any

import offload
from airflow_offload.hooks.offload import OffloadHook
from airflow_offload.version_compat import BaseTrigger, TriggerEvent, mask_secret

RETRIES = 12  # failed reads in a row before giving up (backoff from 2 s to 60 s: 4 to 8 minutes with jitter)
READ_RETRY = offload.RetryPolicy(first=2.0, factor=2.0, cap=60.0, attempts=RETRIES + 1)


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
        yield TriggerEvent(event)

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
