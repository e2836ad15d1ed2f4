"""The built-in schedulers, runtimes and transports, registered through the public hooks."""

from __future__ import annotations

from collections.abc import Iterator

from offload.hookspecs import RuntimePlugin, SchedulerPlugin, TransportPlugin, hookimpl


@hookimpl
def offload_schedulers() -> Iterator[SchedulerPlugin]:
    from offload.schedulers.gridengine import GridEngineScheduler
    from offload.schedulers.local import LocalScheduler
    from offload.schedulers.slurm import SlurmScheduler

    yield SchedulerPlugin("slurm", SlurmScheduler)
    yield SchedulerPlugin("gridengine", GridEngineScheduler)
    yield SchedulerPlugin("local", LocalScheduler)


@hookimpl
def offload_runtimes() -> Iterator[RuntimePlugin]:
    from offload.runtimes.apptainer import ApptainerRuntime
    from offload.runtimes.charliecloud import CharliecloudRuntime
    from offload.runtimes.none import NoRuntime
    from offload.runtimes.podman import PodmanRuntime

    yield RuntimePlugin("apptainer", lambda options: ApptainerRuntime("apptainer", options))
    yield RuntimePlugin("singularity", lambda options: ApptainerRuntime("singularity", options))
    yield RuntimePlugin("charliecloud", CharliecloudRuntime)
    yield RuntimePlugin("podman", PodmanRuntime)
    yield RuntimePlugin("none", NoRuntime)


@hookimpl
def offload_transports() -> Iterator[TransportPlugin]:
    from offload.transports.local import LocalTransport
    from offload.transports.ssh import SSHTransport

    yield TransportPlugin("ssh", SSHTransport)
    yield TransportPlugin("local", LocalTransport)
