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
from offload.schedulers.base import NodeResources
from offload.site import Site

_RUNTIME_BINARY = {"apptainer": "apptainer", "singularity": "singularity", "charliecloud": "ch-run", "podman": "podman"}
_SCHEDULER_COMMANDS = {"slurm": ("sbatch", "squeue", "scancel")}


@dataclass(frozen=True)
class Check:
    name: str
    outcome: str  # "ok", "fail" or "skip"
    detail: str
    fix: str = ""


def run_checks(config: SiteConfig) -> Iterator[Check]:
    yield Check("profile", "ok", f"{config.name} from {config.source}")
    site = Site(config)
    try:
        yield from _loop.run(_checks(site))
    finally:
        site.close()


async def _checks(site: Site) -> list[Check]:
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

    async def shell(script: str) -> tuple[int, str]:
        result = await transport.run(["sh", "-c", script], check=False)
        return result.exit_status, (result.stdout + result.stderr).strip()

    for command in _SCHEDULER_COMMANDS.get(config.scheduler, ()):
        rc, out = await shell(f"command -v {command}")
        if rc == 0:
            results.append(Check(command, "ok", out))
        else:
            setup = "; ".join(config.setup) or "nothing"
            results.append(Check(command, "fail", "not on PATH", f"add a 'setup' line (now: {setup}) or PATH"))
    if config.scheduler == "slurm":
        rc, out = await shell("sacct --noheader -X --starttime now-1minutes --format=JobID >/dev/null 2>&1")
        results.append(
            Check("sacct", "ok", "accounting available")
            if rc == 0
            else Check("sacct", "skip", "no accounting: exit codes come from the job's exit code file")
        )

    binary = _RUNTIME_BINARY.get(config.runtime)
    if binary:
        rc, out = await shell(f"{' ; '.join([*config.setup, ''])} command -v {binary}")
        results.append(
            Check("runtime", "ok", f"{config.runtime}: {out.splitlines()[-1] if out else binary}")
            if rc == 0
            else Check("runtime", "fail", f"{binary} not found on the login node", "add 'module load ...' to setup")
        )
    image = config.image
    if image and "://" not in image:
        rc, _ = await shell(f"test -e {shlex.quote(image)}")
        results.append(
            Check("image", "ok", image)
            if rc == 0
            else Check("image", "fail", f"{image} does not exist on the site", "fix 'image' in the profile")
        )
    elif image:
        results.append(Check("image", "skip", f"{image} is pulled when a job starts"))
    else:
        results.append(Check("image", "skip", "no default image: every job must name one"))

    try:
        jobs_dir = await site._jobs_dir()
        rc, out = await shell(f"mkdir -p {shlex.quote(jobs_dir)} && test -w {shlex.quote(jobs_dir)}")
        results.append(
            Check("workdir", "ok", jobs_dir)
            if rc == 0
            else Check("workdir", "fail", f"{jobs_dir}: {out}", "set 'workdir' to a writable directory")
        )
    except OffloadError as exc:
        results.append(Check("workdir", "fail", str(exc), "set 'workdir' to a writable directory"))

    try:
        nodes = await site._scheduler.nodes(transport)
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
    return results
