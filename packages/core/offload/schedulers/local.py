"""The ``local`` scheduler: each job is a background process group on this machine (or a login node).

It keeps the same job directory layout and exit code file as SLURM, so the rest of offload cannot tell the
difference: examples run on a laptop first and move to a site by changing the site's name.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from offload.config import SiteConfig
from offload.errors import ConfigError
from offload.jobfiles import CANCELLED, EXIT_CODE, OUTPUT, STARTED
from offload.jobs import JobRef, JobState, JobStatus
from offload.schedulers.base import NodeResources, Scheduler, exit_code_files
from offload.spec import JobSpec, Resources
from offload.transports.base import Transport

log = logging.getLogger("offload.local")

# When process $1 started: the kernel's clock ticks where /proc has them (Linux), else ps's start time.
_STARTED = (
    'started() { if [ -r "/proc/$1/stat" ]; then sed "s/.*) //" "/proc/$1/stat" | cut -d" " -f20; '
    'else ps -o lstart= -p "$1"; fi; }; '
)
# Is process $1 still the job of directory $2? Same start time as recorded at submission (no record: trust it).
_OURS = _STARTED + (
    f'ours() {{ [ ! -s "$2/{STARTED}" ] || [ "$(started "$1" 2>/dev/null)" = "$(cat "$2/{STARTED}")" ]; }}; '
)


class LocalScheduler(Scheduler):
    name = "local"
    runs_on_client = True  # jobs are processes of this machine: they reach its services directly
    supports_arrays = False
    task_index = ""
    job_env = ()  # a local job is a process of this machine: nothing of a scheduler's to pass on

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self._told_gpus = False

    # One machine, one copy: multi-node jobs are refused before they are submitted.
    copy_env: dict[str, str] = {}
    first_node = ""

    def directives(
        self, spec: JobSpec, jobdir: str, array_size: int | None, parallelism: int | None = None
    ) -> list[str]:
        res = spec.resources
        if res.total_gpus and not self._told_gpus:
            self._told_gpus = True
            log.warning("the local site has no GPUs to give: the job runs here without any (CUDA_VISIBLE_DEVICES "
                        "is not set); name an HPC site to get %d", res.total_gpus)  # fmt: skip
        if res.nodes > 1 or (res.tasks_per_node or 1) > 1:
            raise ConfigError(
                f"the local site runs jobs on this one machine, once each: nodes={res.nodes} and "
                f"tasks_per_node={res.tasks_per_node} need an HPC site (--site NAME)"
            )
        return []

    def launcher(self, res: Resources) -> list[str]:
        raise ConfigError("the local site cannot start copies of a job on several nodes")

    def submit_line(self, script_path: str) -> str:
        # set -m: the job gets a process group of its own, so cancel can stop the whole tree. Its start time is
        # kept beside it: a pid the system reuses later is never taken for the job (nor killed by a cancel).
        return (
            f'{_STARTED}set -m; bash {script_path} > "$(dirname {script_path})/{OUTPUT}" 2>&1 < /dev/null & '
            f'offload_pid=$!; started "$offload_pid" > "$(dirname {script_path})/{STARTED}" 2>/dev/null; '
            'printf "%s\\n" "$offload_pid"; set +m'
        )

    def sweep_lines(self, jobs_dir: str) -> list[str]:
        return []  # jobs start at once: a secrets file never waits for a start that does not come

    def ids_in(self, text: str) -> list[str]:
        return [word for word in text.split() if word.isdigit()]

    def explain(self, message: str) -> str:
        return ""

    async def limits(self, transport: Transport) -> dict[str, int]:
        return {}

    def job_ids(self, output: str, array_size: int | None) -> list[str]:
        pid = output.strip().splitlines()[-1].strip() if output.strip() else ""
        if not pid.isdigit():
            raise ValueError(f"the local launcher printed {output!r} instead of a process id")
        return [pid]

    async def poll(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        # A local job is known by its directory (this machine's records, or given): a bare process id names no
        # job, even a live process's, and an empty directory would make the script read /exit_code, /cancelled.
        refs = [ref for ref in refs if ref.jobdir]
        if not refs:
            return {}
        script = (
            'while [ "$#" -gt 0 ]; do pid=$1; dir=$2; shift 2; '
            f'if [ -f "$dir/{EXIT_CODE}" ]; then echo "$pid done"; '
            f'elif [ -f "$dir/{CANCELLED}" ]; then echo "$pid cancelled"; '
            'elif kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" | cut -c1)" != Z ] && ours "$pid" "$dir"; '
            'then echo "$pid running"; '
            'else echo "$pid done"; fi; done'
        )
        script = _OURS + script
        args = [arg for ref in refs for arg in (ref.id, ref.jobdir)]
        result = await transport.run(["sh", "-c", script, "sh", *args])
        seen = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
        statuses: dict[str, JobStatus] = {}
        finished = [ref for ref in refs if seen.get(ref.id) == "done"]
        if finished:
            for job_id, status in (await exit_code_files(transport, finished)).items():
                if status.state is JobState.UNKNOWN and job_id in {r.id for r in finished if r.jobdir}:
                    # the process of a job we know is gone for sure: it never got to the end
                    status = JobStatus(JobState.FAILED, "the process ended without writing its exit code (killed?)")
                statuses[job_id] = status
        for ref in refs:
            if seen.get(ref.id) == "running":
                statuses[ref.id] = JobStatus(JobState.RUNNING, node="localhost")
            elif seen.get(ref.id) == "cancelled":
                statuses[ref.id] = JobStatus(JobState.CANCELLED, "cancelled by the user")
        return statuses

    async def nodes(self, transport: Transport) -> list[NodeResources]:
        import os

        return [NodeResources("localhost", ("local",), "idle", 0, 0, os.cpu_count() or 1, 0, 0, 0)]

    async def step(self, transport: Transport, ref: JobRef, node: str, argv: list[str]) -> list[str] | None:
        return None  # the job runs on this machine: it reaches this machine's services directly

    @staticmethod
    def first_host(nodelist: str) -> str:
        return nodelist

    async def interactive(self, transport: Transport, ref: JobRef, argv: list[str], pty: bool = True) -> list[str]:
        return argv  # local jobs run on this machine: the shell can simply start here

    async def cancel(self, transport: Transport, refs: Sequence[JobRef]) -> None:
        # A ref without a directory comes from a failed submission's jobid file (submit.undo): its pid is the
        # job's, and there is no directory to mark it cancelled in (never "/cancelled").
        script = (
            'stop() { kill -TERM "-$1" 2>/dev/null || kill -TERM "$1" 2>/dev/null; }; '
            'while [ "$#" -gt 0 ]; do pid=$1; dir=$2; shift 2; '
            'if [ -z "$dir" ]; then stop "$pid"; '
            f'elif [ ! -f "$dir/{EXIT_CODE}" ] && ours "$pid" "$dir"; then : > "$dir/{CANCELLED}"; stop "$pid"; fi; '
            "done; true"
        )
        script = _OURS + script
        args = [arg for ref in refs for arg in (ref.id, ref.jobdir)]
        await transport.run(["sh", "-c", script, "sh", *args])
