"""``offload doctor SITE``: check a site end to end and say how to fix what fails.

Each check runs over the site's own transport, exactly as jobs will; one failure does not hide the others
unless the site cannot be reached at all.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass

from offload import _loop
from offload.config import SiteConfig
from offload.errors import HostKeyError, OffloadError
from offload.images import is_pull, is_pushed_name
from offload.runtimes.base import ContainerContext
from offload.schedulers.base import NodeResources
from offload.site import Site
from offload.sizes import format_size
from offload.spec import JobSpec, Resources


@dataclass(frozen=True)
class Check:
    name: str
    outcome: str  # "ok", "fail" or "skip"
    detail: str
    fix: str = ""


def run_checks(config: SiteConfig, network: bool = True) -> Iterator[Check]:
    yield Check("profile", "ok", f"{config.name} from {config.source}")
    site = Site(config)
    try:
        yield from _loop.run(_checks(site, network))
    finally:
        site.close()


async def _checks(site: Site, network: bool = True) -> list[Check]:
    config, transport = site.config, site.transport
    results: list[Check] = []
    try:
        await transport.run(["true"])
    except HostKeyError as exc:
        return [Check("host key", "fail", str(exc).split(". ")[0], f"offload sites trust {config.name}")]
    except OffloadError as exc:
        return [Check("connection", "fail", str(exc), "check host, port, user and identity_files in the profile")]
    results.append(Check("connection", "ok", transport.description))
    if config.transport == "ssh":
        results.append(Check("host key", "ok", "verified against known_hosts"))

    shell_argv = shlex.split(config.shebang[2:]) or ["/bin/bash"]

    async def shell(script: str) -> tuple[int, str]:
        """``script`` as a job's script runs it: the profile's shell (``#!/bin/bash -l``) after its setup lines."""
        result = await transport.run([*shell_argv, "-c", "\n".join([*config.setup, script])], check=False)
        return result.exit_status, (result.stdout + result.stderr).strip()

    # the scheduler plugin names its commands and adds its own checks: the doctor knows no scheduler's words
    for command in site.scheduler.commands:
        rc, out = await shell(f"command -v {command}")
        if rc == 0:
            results.append(Check(command, "ok", out.splitlines()[-1]))
        else:
            setup = "; ".join(config.setup) or "nothing"
            results.append(Check(command, "fail", "not on PATH", f"add a 'setup' line (now: {setup}) or PATH"))
    try:
        results += [Check(*check) for check in await site.scheduler.doctor_checks(transport, shell)]
    except OffloadError as exc:
        results.append(Check(config.scheduler, "fail", str(exc), "check that the scheduler's commands answer"))

    binary = site.runtime.binary  # the runtime plugin names the program it runs
    if binary:
        rc, out = await shell(f"command -v {binary}")
        results.append(
            Check("runtime", "ok", f"{config.runtime}: {out.splitlines()[-1] if out else binary}")
            if rc == 0
            else Check("runtime", "fail", f"{binary} not found on the login node", "add 'module load ...' to setup")
        )
    results.append(await _image_check(site))

    try:
        jobs_dir = f"{await site.aworkdir()}/jobs"
        rc, out = await shell(f"(umask 077 && mkdir -p {shlex.quote(jobs_dir)}) && test -w {shlex.quote(jobs_dir)}")
        results.append(
            Check("workdir", "ok", jobs_dir)
            if rc == 0
            else Check("workdir", "fail", f"{jobs_dir}: {out}", "set 'workdir' to a writable directory")
        )
    except OffloadError as exc:
        results.append(Check("workdir", "fail", str(exc), "set 'workdir' to a writable directory"))

    try:
        nodes = await site.anodes()
    except OffloadError as exc:
        results.append(Check("partitions", "fail", str(exc), "check that the scheduler's commands answer"))
        nodes = []
    partitions: dict[str, list[NodeResources]] = {}
    for node in nodes:
        for name in node.partitions:
            partitions.setdefault(name, []).append(node)
    if partitions:
        summary = "; ".join(
            f"{name}: {len(members)} node(s), GPUs {sum(n.gpus_free for n in members)}/{sum(n.gpus for n in members)}"
            f" free" for name, members in sorted(partitions.items()))  # fmt: skip
        results.append(Check("partitions", "ok", summary))
    gpu_partition = config.gpu_partition or config.partition
    if config.gpus_per_node and gpu_partition and partitions:
        members = partitions.get(gpu_partition, [])
        if not members:
            results.append(Check("gpus", "fail", f"no partition {gpu_partition!r} on the site",
                                 f"set 'gpu_partition' to one of: {', '.join(sorted(partitions))}"))  # fmt: skip
        elif not any(n.gpus for n in members):
            results.append(Check("gpus", "fail", f"partition {gpu_partition!r} has no GPUs", "fix 'gpu_partition'"))
        else:
            most = max(n.gpus for n in members)
            if most >= config.gpus_per_node:
                results.append(Check("gpus", "ok", f"partition {gpu_partition}: up to {most} GPUs per node"))
            else:
                detail = f"gpus_per_node = {config.gpus_per_node}, but nodes of {gpu_partition} have at most {most}"
                results.append(Check("gpus", "fail", detail, f"set gpus_per_node = {most}"))
    elif not config.gpus_per_node:
        results.append(Check("gpus", "skip", "no gpus_per_node/gpu_partition in the profile"))
    if network:
        results.append(await _node_network(site))
    return results


# Run on a compute node, outside any container: can it open a connection beyond the cluster?
_NETWORK_PROBE = """
import socket
for host, port in (("pypi.org", 443), ("1.1.1.1", 443), ("8.8.8.8", 53)):
    try:
        socket.create_connection((host, port), timeout=5).close()
        print("offload-network open", host, port)
        break
    except OSError as exc:
        print("offload-network closed", host, port, exc)
"""


async def _image_check(site: Site) -> Check:
    """The profile's default image: in the cache (and how big), pullable (and how big), or on the site."""
    config = site.config
    image = config.image
    if not image:
        return Check("image", "skip", "no default image: every job must name one")
    if (is_pull(image) and config.pull == "login") or is_pushed_name(image):
        try:
            cached = {c.name: c for c in await site.images.alist()}
        except OffloadError as exc:
            return Check("image", "fail", f"the image cache: {exc}", "check that python3 runs on the login node")
        here = cached.get(image)
        if is_pushed_name(image) and here is None and site.runtime.image_path(ContainerContext(image)) is not None:
            return Check("image", "fail", f"no image named {image!r} in the cache",
                         f"offload image push PATH --name {image} --site {config.name}")  # fmt: skip
        if is_pull(image):
            try:
                digest, size = await site.images.aremote_digest(image)
            except OffloadError as exc:
                if here is not None:
                    return Check("image", "ok", f"{image} cached ({format_size(here.size)}); the registry: {exc}")
                return Check("image", "fail", str(exc), "fix 'image', or push it: offload image push PATH --name NAME")
            if here is None:
                return Check("image", "ok", f"{image} pullable ({format_size(size)} to download); the first job "
                             f"pulls it once on the login node, or now: offload image pull {image}")  # fmt: skip
            newer = "" if here.digest == digest else "; the tag has moved: the next job pulls the new image"
            return Check("image", "ok", f"{image} cached ({here.digest[:19]}, {format_size(here.size)}){newer}")
        if here is not None:
            return Check("image", "ok", f"{image} cached ({here.digest[:19]}, {format_size(here.size)})")
    path = site.runtime.image_path(ContainerContext(image))
    if path is None:
        return Check("image", "skip", f'{image} is pulled by the runtime when a job starts (pull = "node")')
    result = await site.transport.run(["test", "-e", path], check=False)
    if result.exit_status == 0:
        return Check("image", "ok", path)
    return Check("image", "fail", f"{path} does not exist on the site", "fix 'image' in the profile")


async def _node_network(site: Site) -> Check:
    """A one-minute job that tries to leave the cluster: tells whether jobs need ``reach`` for your services."""
    if site.scheduler.runs_on_client:
        return Check("node network", "ok", "jobs run on this machine: they reach what it reaches")
    spec = JobSpec(["sh", "-c", f"python3 -c {shlex.quote(_NETWORK_PROBE)} 2>&1 || echo offload-network unknown"],
                   resources=Resources(walltime="00:02:00"), name="offload-doctor")  # fmt: skip
    try:
        (job,) = await site.asubmit_many([spec])
        status = await job.finished(timeout=180)
        log = await job.atail(10)
    except (OffloadError, TimeoutError) as exc:
        return Check("node network", "skip", f"could not run a probe job ({exc}); try again when the queue is short")
    if "offload-network open" in log:
        return Check("node network", "ok", "compute nodes have outbound network")
    if "offload-network closed" in log:
        return Check("node network", "ok", "compute nodes have no outbound network: jobs reach your services "
                     "(MLflow, a database, a hub) through --reach / JobSpec(reach=...)")  # fmt: skip
    return Check("node network", "skip", f"the probe job ended {status.describe()} without an answer: {log[-200:]}")
