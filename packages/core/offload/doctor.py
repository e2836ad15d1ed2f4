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

    if config.scheduler == "slurm":
        partition = config.gpu_partition or config.partition
        if config.gpus_per_node and partition:
            rc, out = await shell(f"sinfo --noheader --partition={shlex.quote(partition)} --format=%G")
            gres = {g for g in out.split() if g.startswith("gpu")}
            results.append(
                Check("gpus", "ok", f"partition {partition}: {' '.join(sorted(gres))}")
                if rc == 0 and gres
                else Check("gpus", "fail", f"no GPU GRES in partition {partition}: {out}", "fix 'gpu_partition'")
            )
        else:
            results.append(Check("gpus", "skip", "no gpus_per_node/gpu_partition in the profile"))
    return results
