"""SLURM: ``sbatch --parsable`` (arrays for identical jobs), one ``squeue`` per poll, one ``scancel``.

Finished jobs are read back from ``squeue -t all`` while slurmctld remembers them (``MinJobAge``), then from
``sacct`` where the site keeps accounting, then from the exit code file the batch script leaves in the job
directory; the exit code is the payload's own in every case.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from offload.config import SiteConfig
from offload.errors import ConfigError, RemoteCommandError
from offload.jobs import JobRef, JobState, JobStatus
from offload.spec import JobSpec, format_walltime, parse_walltime
from offload.transports.base import Transport

log = logging.getLogger("offload.slurm")

STATES = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESV_DEL_HOLD": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "STOPPED": JobState.PENDING,
    "RESIZING": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "NODE_FAIL": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "OUT_OF_MEMORY": JobState.FAILED,
    "DEADLINE": JobState.TIMEOUT,
    "SPECIAL_EXIT": JobState.FAILED,
    "REVOKED": JobState.CANCELLED,
    "PREEMPTED": JobState.CANCELLED,
    "CANCELLED": JobState.CANCELLED,
    "TIMEOUT": JobState.TIMEOUT,
}

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\[\]-]+$")
_CHUNK = 500  # ids per squeue/scancel call, far below any command line limit


def _value(option: str, value: object) -> str:
    text = str(value)
    if not _SAFE_VALUE.match(text):
        raise ConfigError(f"{option} {text!r} contains characters SLURM does not accept (spaces, quotes, ...)")
    return text


class SlurmScheduler:
    name = "slurm"
    supports_arrays = True
    task_index = "${SLURM_ARRAY_TASK_ID:-}"

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self._has_sacct: bool | None = None

    # -- rendering --------------------------------------------------------------------------------------

    def directives(self, spec: JobSpec, jobdir: str, array_size: int | None) -> list[str]:
        site, res = self.config, spec.resources
        if "\n" in jobdir or " " in jobdir or "'" in jobdir or '"' in jobdir:
            raise ConfigError(f"the site's workdir {jobdir!r} has spaces or quotes, which #SBATCH lines cannot hold")
        opts = [f"--job-name={_value('job name', spec.name or 'offload')}"]
        suffix = ".%a" if array_size else ""
        opts += [f"--output={jobdir}/output{suffix}", f"--chdir={jobdir}"]
        if array_size:
            opts.append(f"--array=0-{array_size - 1}")
        opts.append(f"--nodes={res.nodes}")
        if res.cpus:
            opts.append(f"--cpus-per-task={res.cpus}")
        if res.memory_mb:
            opts.append(f"--mem={res.memory_mb}M")
        partition = res.partition or (site.gpu_partition if res.gpus and site.gpu_partition else site.partition)
        if partition:
            opts.append(f"--partition={_value('partition', partition)}")
        if res.gpus:
            if site.gpus_per_node is not None and res.gpus > site.gpus_per_node * res.nodes:
                raise ConfigError(
                    f"{res.gpus} GPUs asked on {res.nodes} node(s), but site '{site.name}' has "
                    f"{site.gpus_per_node} per node: ask for nodes={-(-res.gpus // site.gpus_per_node)}"
                )
            if site.gpu_request == "--gres":
                opts.append(f"--gres=gpu:{res.gpus // res.nodes if res.nodes > 1 else res.gpus}")
            elif site.gpu_request == "--gpus-per-node":
                opts.append(f"--gpus-per-node={-(-res.gpus // res.nodes)}")
            else:
                opts.append(f"--gpus={res.gpus}")
        walltime = res.walltime_seconds or parse_walltime(site.walltime)
        if walltime:
            opts.append(f"--time={format_walltime(walltime)}")
        if res.account or site.account:
            opts.append(f"--account={_value('account', res.account or site.account)}")
        if res.qos or site.qos:
            opts.append(f"--qos={_value('qos', res.qos or site.qos)}")
        for option in (*site.scheduler_options, *res.extra):
            if "\n" in option:
                raise ConfigError(f"scheduler option {option!r} contains a newline")
            opts.append(option)
        return [f"#SBATCH {o}" for o in opts]

    def submit_line(self, script_path: str) -> str:
        return f"sbatch --parsable < {script_path}"

    def job_ids(self, output: str, array_size: int | None) -> list[str]:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        if not lines:
            raise ValueError("sbatch printed no job id")
        first = lines[-1].split(";")[0].strip()  # --parsable prints "id" or "id;cluster"
        if not first.isdigit():
            raise ValueError(f"sbatch printed {first!r} instead of a job id")
        return [f"{first}_{i}" for i in range(array_size)] if array_size else [first]

    # -- status -----------------------------------------------------------------------------------------

    async def poll(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        statuses: dict[str, JobStatus] = {}
        for start in range(0, len(refs), _CHUNK):
            statuses.update(await self._squeue(transport, refs[start : start + _CHUNK]))
        missing = [ref for ref in refs if ref.id not in statuses]
        if missing:
            statuses.update(await self._finished_elsewhere(transport, missing))
        return statuses

    async def _squeue(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        argv = [
            "squeue", "--noheader", "--array", "--states=all",
            "--jobs=" + ",".join(ref.id for ref in refs),
            "--Format=JobArrayID:|,State:|,Reason:|,exit_code:|,NodeList:|",
        ]  # fmt: skip
        result = await transport.run(argv, check=False)
        if result.exit_status != 0:
            if "Invalid job id" in result.stderr:
                return {}  # none of them is in slurmctld's memory any more
            result.check()
        wanted = {ref.id for ref in refs}
        statuses: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < 5:
                continue
            job_id, state, reason, raw_exit, node = (f.strip() for f in fields[:5])
            if job_id not in wanted:
                continue
            exit_code = signal = None
            if raw_exit.isdigit():
                exit_code, signal = int(raw_exit) >> 8, (int(raw_exit) & 0x7F) or None
            statuses[job_id] = _status(state, reason, exit_code, signal, node)
        return statuses

    async def _finished_elsewhere(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        statuses: dict[str, JobStatus] = {}
        if self._has_sacct is not False:
            argv = ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State,ExitCode"]
            result = await transport.run([*argv, "--jobs=" + ",".join(r.id for r in refs)], check=False)
            self._has_sacct = result.exit_status == 0
            if self._has_sacct:
                for line in result.stdout.splitlines():
                    fields = line.split("|")
                    if len(fields) >= 3 and ":" in fields[2]:
                        code, sig = fields[2].split(":", 1)
                        state = fields[1].split()[0] if fields[1] else "UNKNOWN"
                        statuses[fields[0]] = _status(state, "", int(code), int(sig) or None, "")
        rest = [ref for ref in refs if ref.id not in statuses]
        if rest:
            statuses.update(await exit_code_files(transport, rest))
        return statuses

    async def interactive(self, transport: Transport, ref: JobRef, argv: list[str]) -> list[str]:
        """A step in the running job, sharing its resources, with a terminal."""
        job_id = ref.id
        if "_" in job_id:  # srun wants the array task's own job id
            out = await transport.run(["squeue", "--noheader", f"--jobs={job_id}", "--Format=JobID"])
            job_id = out.stdout.strip() or job_id
        return ["srun", f"--jobid={job_id}", "--overlap", "--pty", *argv]

    async def find(self, transport: Transport, name: str) -> list[JobRef]:
        """Jobs of the site's user with this name that slurmctld still knows (queued or recently ended),
        newest first. Their job directory is their working directory (offload submits with --chdir)."""
        argv = ["squeue", "--noheader", "--array", "--states=all", "--me", f"--name={_value('job name', name)}",
                "--Format=JobArrayID:|,JobID:|,WorkDir:|"]  # fmt: skip
        result = (await transport.run(argv)).stdout
        refs = []
        for line in result.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 3 and fields[0]:
                array_id, raw_id, workdir = fields[:3]
                index = int(array_id.split("_")[1]) if "_" in array_id else None
                refs.append((int(raw_id) if raw_id.isdigit() else 0, JobRef(array_id, workdir, index)))
        return [ref for _, ref in sorted(refs, key=lambda pair: pair[0], reverse=True)]

    async def cancel(self, transport: Transport, refs: Sequence[JobRef]) -> None:
        for start in range(0, len(refs), _CHUNK):
            chunk = refs[start : start + _CHUNK]
            result = await transport.run(["scancel", *(ref.id for ref in chunk)], check=False)
            if result.exit_status != 0:
                # scancel complains about jobs that already ended; only a job still alive is a failure.
                alive = [s for s in (await self.poll(transport, chunk)).values() if not s.state.is_terminal]
                if alive:
                    raise RemoteCommandError(
                        f"scancel failed and {len(alive)} job(s) are still queued or running: {result.stderr.strip()}",
                        argv=list(result.argv),
                        exit_status=result.exit_status,
                        stderr=result.stderr,
                    )


def _status(state: str, reason: str, exit_code: int | None, signal: int | None, node: str) -> JobStatus:
    base = state.split()[0].rstrip("+") if state else "UNKNOWN"
    mapped = STATES.get(base, JobState.UNKNOWN)
    if mapped is JobState.UNKNOWN:
        log.warning("unknown SLURM state %r", state)
    if reason in ("None", "(null)"):
        reason = ""
    if base in ("NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED", "DEADLINE", "REVOKED") and not reason:
        reason = base
    if not mapped.is_terminal:
        exit_code = signal = None
    return JobStatus(mapped, reason, exit_code, node, signal)


async def exit_code_files(transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
    """Statuses from the exit code files the batch script writes, in one command for all ``refs``."""
    script = 'for f in "$@"; do printf "%s|" "$f"; cat "$f" 2>/dev/null | head -n1; echo; done'
    result = await transport.run(["sh", "-c", script, "sh", *(ref.exitcode_path for ref in refs)], check=False)
    by_path: dict[str, str] = {}
    for line in result.stdout.splitlines():
        path, _, code = line.rpartition("|")
        if path:
            by_path[path] = code.strip()
    statuses: dict[str, JobStatus] = {}
    for ref in refs:
        code = by_path.get(ref.exitcode_path, "")
        if code.isdigit():
            state = JobState.COMPLETED if code == "0" else JobState.FAILED
            statuses[ref.id] = JobStatus(state, "" if code == "0" else "NonZeroExitCode", int(code))
        else:
            # Gone from the queue without reaching the end of its script: killed, timed out or lost.
            statuses[ref.id] = JobStatus(
                JobState.FAILED, "left the queue without an exit code (no accounting record on this site)"
            )
    return statuses
