"""The scheduler interface. Submission itself is shared (:mod:`offload.submit`); a scheduler says how."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from offload.jobs import JobRef, JobStatus
from offload.spec import JobSpec
from offload.transports.base import Transport


class Scheduler(Protocol):
    name: str
    supports_arrays: bool
    task_index: str  # shell expression for the array task index inside the batch script

    def directives(self, spec: JobSpec, jobdir: str, array_size: int | None) -> list[str]:
        """Header lines of the batch script (e.g. ``#SBATCH --gpus=2``). Raise ConfigError for bad values."""
        ...

    def submit_line(self, script_path: str) -> str:
        """A shell line that submits ``script_path`` and prints the job id (the path is already quoted)."""
        ...

    def job_ids(self, output: str, array_size: int | None) -> list[str]:
        """The ids of the submitted job (one per array task) from the submit line's output."""
        ...

    async def poll(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """Statuses of ``refs`` in as few scheduler calls as possible (ideally one)."""
        ...

    async def cancel(self, transport: Transport, refs: Sequence[JobRef]) -> None:
        """Cancel all ``refs`` in one call."""
        ...

    async def interactive(self, transport: Transport, ref: JobRef, argv: list[str]) -> list[str]:
        """The argv that runs ``argv`` attached to a terminal inside the running job ``ref``."""
        ...

    async def find(self, transport: Transport, name: str) -> list[JobRef]:
        """Jobs of this user with this name still known to the scheduler, newest first (optional: without
        it, offload looks in this machine's job records)."""
        ...
