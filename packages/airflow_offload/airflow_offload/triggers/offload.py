"""``OffloadJobTrigger``: waits in the triggerer for an offload job to end, freeing the worker slot.

It only watches: submission happens in the operator, never here, because a trigger may run more than once.
All triggers of one triggerer process share one SSH connection per site and one ``squeue`` per interval.
When a user kills the deferred task (Airflow 3.3+ calls ``on_kill``), the job is cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import offload
from airflow_offload.hooks.offload import OffloadHook
from airflow_offload.version_compat import BaseTrigger, TriggerEvent


class OffloadJobTrigger(BaseTrigger):
    def __init__(
        self,
        job_id: str,
        jobdir: str,
        index: int | None = None,
        site: str | None = None,
        offload_conn_id: str | None = None,
        poll_interval: float | None = None,
    ) -> None:
        super().__init__()
        self.job_id = job_id
        self.jobdir = jobdir
        self.index = index
        self.site = site
        self.offload_conn_id = offload_conn_id
        self.poll_interval = poll_interval

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
            },
        )

    async def _job(self) -> offload.Job:
        site = await OffloadHook(offload_conn_id=self.offload_conn_id, site=self.site).aget_site()
        return await site.ajob(self.job_id, jobdir=self.jobdir, index=self.index)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        event: dict[str, Any] = {"job_id": self.job_id, "jobdir": self.jobdir, "index": self.index}
        try:
            job = await self._job()
            status = await job.finished()
            event.update(state=status.state.value, exit_code=status.exit_code, reason=status.reason)
        except offload.OffloadError as exc:
            event["error"] = str(exc)
        yield TriggerEvent(event)

    async def on_kill(self) -> None:
        job = await self._job()
        self.log.info("Deferred task killed: cancelling job %s", self.job_id)
        await job.acancel()
