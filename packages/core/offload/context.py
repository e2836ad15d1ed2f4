"""What a service under the :class:`~offload.Site` facade may use of its site: :class:`SiteContext`.

The facade (``offload.site``) wires the plugins and owns the per-process state; the services it holds (the
image cache, the relays, the submitter) are given this context instead of the Site, so nothing below the facade
imports it (import-linter's "engine-below-facade" contract keeps that). A context is made again, with the new
transport, poller and records, when a forked child starts its own connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pluggy

    from offload.config import SiteConfig
    from offload.poller import Poller
    from offload.records import JobRecords
    from offload.runtimes.base import Runtime
    from offload.schedulers.base import Scheduler
    from offload.transports.base import Transport


@dataclass(frozen=True)
class SiteContext:
    """One site's parts, for its services: its name and profile, its connection, its plugins (and their hooks),
    its poller, this machine's job records and its work directory (absolute, asked of the site once)."""

    name: str
    config: SiteConfig
    transport: Transport
    scheduler: Scheduler
    runtime: Runtime
    poller: Poller
    workdir: Callable[[], Awaitable[str]]
    records: JobRecords
    hook: pluggy.HookRelay

    @property
    def relays_needed(self) -> bool:
        """Jobs on another machine reach this one's services through a relay; local jobs reach them directly."""
        return not self.scheduler.runs_on_client
