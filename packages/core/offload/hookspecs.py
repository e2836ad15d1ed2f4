"""offload's plugin hooks. Every built-in scheduler, runtime and transport registers through these too.

A plugin is a module or object with functions marked ``@offload.hookimpl``, registered through the entry point
group ``offload`` in its package metadata::

    [project.entry-points.offload]
    pbs = "offload_pbs.plugin"

The register hooks (``offload_schedulers``, ``offload_runtimes``, ``offload_transports``) are called for
every plugin and their results collected; two plugins claiming one name is an error that names both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from offload.config import SiteConfig
    from offload.script import BatchScript
    from offload.spec import JobSpec

hookspec = pluggy.HookspecMarker("offload")
hookimpl = pluggy.HookimplMarker("offload")  # what a plugin marks its hook functions with


@dataclass(frozen=True)
class SchedulerPlugin:
    name: str
    factory: Callable[[Any], Any]


@dataclass(frozen=True)
class RuntimePlugin:
    name: str
    factory: Callable[[tuple[str, ...]], Any]


@dataclass(frozen=True)
class TransportPlugin:
    name: str
    factory: Callable[[Any], Any]


@hookspec
def offload_schedulers() -> Iterable[SchedulerPlugin]:
    """Yield the schedulers this plugin provides.

    Called once, when the plugin manager is first used. All results are collected; a name must be unique
    across plugins. The factory is called with the site's :class:`~offload.config.SiteConfig`.
    """


@hookspec
def offload_runtimes() -> Iterable[RuntimePlugin]:
    """Yield the container runtimes this plugin provides.

    Called once. All results are collected; names are unique. The factory is called with the site's runtime
    options and returns an object following :class:`offload.runtimes.base.Runtime`.
    """


@hookspec
def offload_transports() -> Iterable[TransportPlugin]:
    """Yield the transports this plugin provides (how a site is reached).

    Called once. All results are collected; names are unique. The factory is called with the site's config
    and returns an object following :class:`offload.transports.base.Transport`.
    """


@hookspec
def offload_job_script(script: BatchScript, spec: JobSpec, site: SiteConfig) -> None:
    """Adjust a batch script before it is rendered and submitted.

    Called for every job, by every plugin that implements it (in registration order, built-ins first). Change
    ``script`` in place (add directives, setup lines or env); the return value is ignored. Values added to
    ``script.setup`` are shell code run as-is: quote anything that came from a user.
    """
