"""SLURM: ``sbatch --parsable`` (arrays for identical jobs), one ``squeue`` per poll, one ``scancel``.

Finished jobs are read back from ``squeue -t all`` while slurmctld remembers them (``MinJobAge``), then from
``sacct`` where the site keeps accounting, then from the exit code file the batch script leaves in the job
directory (which also ends a job accounting still calls running); the exit code is the payload's own in every
case.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

from offload.config import SiteConfig
from offload.errors import ConfigError, RemoteCommandError
from offload.jobs import EndCause, JobRef, JobState, JobStatus
from offload.schedulers.base import (
    NodeResources,
    Scheduler,
    Shell,
    StartEstimate,
    exit_code_files,
    read_answer,
    secrets_sweep,
)
from offload.spec import JobSpec, Resources, format_walltime, parse_memory, parse_walltime
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

# SLURM's end states that say more than their JobState: as data (JobStatus.cause)
_CAUSES = {"OUT_OF_MEMORY": EndCause.OUT_OF_MEMORY, "NODE_FAIL": EndCause.NODE_FAILURE,
           "BOOT_FAIL": EndCause.NODE_FAILURE, "PREEMPTED": EndCause.PREEMPTED}  # fmt: skip

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/\[\]-]+$")
# sbatch's answer: "123" or "123;cluster" (--parsable), or "Submitted batch job 123[ on cluster c2]" from a site
# wrapper that drops --parsable. Any other line (a banner, a quota warning) is not the answer.
_ANSWER = re.compile(r"(\d+)(?:;(\S+))?|Submitted batch job (\d+)(?: on cluster (\S+))?")
_TASK_RANGE = re.compile(r"(\d+)_\[([0-9,%-]+)\]")  # a pending array's one record: 123_[0-4%2]
# Shell lines that set id (and cluster) from one $line of a jobid file, if the line is sbatch's answer
_PARSE_ANSWER = (
    "        c=\n"
    '        case "$line" in "Submitted batch job "*" on cluster "*) c=${line##* on cluster } ;; esac\n'
    '        case "$line" in "Submitted batch job "*) line=${line#Submitted batch job }; '
    "line=${line%% on cluster *} ;; esac\n"
    '        case "$line" in *";"*) c=${line#*;} ;; esac\n'
    "        line=${line%%;*}\n"
    '        case "$line" in ""|*[!0-9]*) ;; *) id=$line; cluster=$c ;; esac\n'
)
_CHUNK = 500  # ids per squeue/sacct/scancel call, far below any command line limit


def _value(option: str, value: object) -> str:
    text = str(value)
    if not _SAFE_VALUE.match(text):
        raise ConfigError(f"{option} {text!r} contains characters SLURM does not accept (spaces, quotes, ...)")
    return text


class SlurmScheduler(Scheduler):
    name = "slurm"
    supports_arrays = True
    task_index = "${SLURM_ARRAY_TASK_ID:-}"
    commands = ("sbatch", "squeue", "scancel")  # what offload doctor looks for on the login node
    # How the site wants GPUs asked for: SLURM's own choices, checked when the profile is read
    profile_keys = {"gpu_request": ("--gpus", "--gres", "--gpus-per-node")}
    # What SLURM tells a job that its payload may need inside the container.
    job_env = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_NODELIST",
               "SLURM_CPUS_PER_TASK", "SLURM_MEM_PER_NODE", "SLURM_PROCID", "SLURM_NODEID", "SLURM_LOCALID",
               "SLURM_NTASKS", "SLURM_NNODES", "SLURMD_NODENAME")  # fmt: skip

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self._accounting: bool | None = None  # False only once sacct said the site keeps no accounting

    # -- rendering --------------------------------------------------------------------------------------

    def directives(
        self, spec: JobSpec, jobdir: str, array_size: int | None, parallelism: int | None = None
    ) -> list[str]:
        if "\n" in jobdir or " " in jobdir or "'" in jobdir or '"' in jobdir:
            raise ConfigError(f"the site's workdir {jobdir!r} has spaces or quotes, which #SBATCH lines cannot hold")
        # offload's own directives first: they are never skipped (names, logs, arrays are how it finds the job)
        own = [f"--job-name={_value('job name', spec.name or 'offload')}"]
        suffix = ".%a" if array_size else ""
        own += [f"--output={jobdir}/output{suffix}", f"--chdir={jobdir}"]
        if array_size:
            own.append(f"--array=0-{array_size - 1}" + (f"%{parallelism}" if parallelism else ""))
        if spec.secrets or spec.reach or spec.relay:
            # The job removes its secrets once it has read them, and a relay's step dies with the run it served:
            # a requeued run would start without either.
            own.append("--no-requeue")
        return [f"#SBATCH {o}" for o in (*own, *self._resource_options(spec))]

    def _resource_options(self, spec: JobSpec) -> list[str]:
        """The options that ask for the job's resources: what the batch script's header and ``--test-only``
        share (offload's own, names, logs, arrays, are the header's alone)."""
        site, res = self.config, spec.resources
        opts = [f"--nodes={res.nodes}"]
        if res.tasks_per_node:
            opts.append(f"--ntasks-per-node={res.tasks_per_node}")
        if res.cpus:
            opts.append(f"--cpus-per-task={res.cpus}")
        if res.memory_mb:
            opts.append(f"--mem={res.memory_mb}M")
        gpus = res.total_gpus
        partition = res.partition or (site.gpu_partition if gpus and site.gpu_partition else site.partition)
        if partition:
            opts.append(f"--partition={_value('partition', partition)}")
        if gpus:
            opts.append(self._gpu_request(res))
        walltime = res.walltime_seconds or parse_walltime(site.walltime)
        if walltime:
            opts.append(f"--time={format_walltime(walltime)}")
        if res.account or site.account:
            opts.append(f"--account={_value('account', res.account or site.account)}")
        if res.qos or site.qos:
            opts.append(f"--qos={_value('qos', res.qos or site.qos)}")
        opts = [o for o in opts if not any(skip in o for skip in res.skip)]  # dask-jobqueue's job_directives_skip
        for option in (*site.scheduler_options, *res.extra):
            if "\n" in option:
                raise ConfigError(f"scheduler option {option!r} contains a newline")
            opts.append(option)
        return opts

    def _gpu_request(self, res: Resources) -> str:
        """Exactly the GPUs asked for, in the site's syntax, or a ConfigError saying why it cannot be said."""
        site, gpus, nodes = self.config, res.total_gpus, res.nodes
        syntax = str(site.scheduler_keys.get("gpu_request") or "--gpus")
        per_node = res.gpus_per_node if res.gpus_per_node is not None else (gpus if nodes == 1 else None)
        capacity = site.gpus_per_node
        if capacity is not None and (per_node or -(-gpus // nodes)) > capacity:
            raise ConfigError(
                f"{gpus} GPUs asked on {nodes} node(s), but site '{site.name}' has {capacity} per node: "
                + _more_nodes(gpus, capacity, syntax)
            )
        if per_node is None and syntax != "--gpus":
            if gpus % nodes:
                raise ConfigError(
                    f"{gpus} GPUs cannot be split evenly over {nodes} nodes, and site '{site.name}' asks for GPUs "
                    f"per node (gpu_request = {syntax!r}): ask for gpus_per_node instead (CLI: "
                    "--gpus-per-node), or a multiple of the node count"
                )
            per_node = gpus // nodes
        if syntax == "--gres":
            return f"--gres=gpu:{per_node}"
        if syntax == "--gpus-per-node" or (res.gpus_per_node is not None and nodes > 1):
            return f"--gpus-per-node={per_node}"
        return f"--gpus={gpus}"

    def launcher(self, res: Resources) -> list[str]:
        """The argv prefix that starts one copy of the payload per task of the allocation, inside the job.

        A copy that fails makes srun stop the others, so a distributed run does not hang on a dead peer."""
        argv = ["srun", "--kill-on-bad-exit=1", f"--nodes={res.nodes}", f"--ntasks-per-node={res.tasks_per_node or 1}"]
        if res.cpus:
            argv.append(f"--cpus-per-task={res.cpus}")  # srun of 22.05 does not inherit it from the job
        return argv

    # What each copy is told: shell expressions evaluated in the copy (SLURM sets these per task).
    copy_env = {
        "RANK": "$SLURM_PROCID",
        "NODE_RANK": "$SLURM_NODEID",
        "LOCAL_RANK": "$SLURM_LOCALID",
        "WORLD_SIZE": "$SLURM_NTASKS",
        "LOCAL_WORLD_SIZE": "${SLURM_NTASKS_PER_NODE%%(*}",
    }
    first_node = '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'

    def submit_line(self, script_path: str) -> str:
        return f"sbatch --parsable < {script_path}"

    def abandon_line(self) -> str:
        return read_answer("a", _PARSE_ANSWER) + '    [ -n "$id" ] && scancel ${cluster:+--clusters="$cluster"} "$id"\n'

    def sweep_lines(self, jobs_dir: str) -> list[str]:
        # a job sent to another cluster (123;c2) is only in that cluster's queue: ask it, or keep the file
        queue = (
            "    queue=$live\n"
            '    if [ -n "$cluster" ]; then queue=$(squeue --noheader --user="$(id -un)" --format=%F '
            '--clusters="$cluster") || continue; fi\n'
        )
        return secrets_sweep(jobs_dir, 'squeue --noheader --user="$(id -un)" --format=%F', _PARSE_ANSWER, queue)

    def ids_in(self, text: str) -> list[str]:
        """Job ids in the answers of the submit command (e.g. jobid files read back after a lost channel): only
        lines that are an answer count, never a number in a banner ("quota: 85 GB used"), which could name
        another job of the user's."""
        return _answers(text)

    def explain(self, message: str) -> str:
        """A line telling what to do about a refusal, when SLURM's words name a limit."""
        lowered = message.lower()
        if "maxsubmitjob" in lowered or "qosmaxsubmitjob" in lowered or "assocmaxsubmitjob" in lowered:
            return ("That is the site's limit on how many jobs you may have queued at once (a QOS or association "
                    "MaxSubmitJobs): wait for jobs to end, or submit fewer at a time.\n")  # fmt: skip
        if "invalid partition" in lowered or "invalid account" in lowered or "invalid qos" in lowered:
            return f"Check the partition, account and qos ('offload doctor {self.config.name}' lists partitions).\n"
        if "maxarraysize" in lowered or "array size" in lowered:
            return "The array is larger than the site allows (MaxArraySize).\n"
        return (f"Check the resources against the site's limits ('offload doctor {self.config.name}' lists "
                "partitions and their free GPUs).\n")  # fmt: skip

    async def doctor_checks(self, transport: Transport, shell: Shell) -> list[tuple[str, str, str, str]]:
        """SLURM's own check for ``offload doctor``: whether accounting answers (else exit code files only)."""
        rc, _ = await shell("sacct --noheader -X --starttime now-1minutes --format=JobID >/dev/null 2>&1")
        if rc == 0:
            return [("sacct", "ok", "accounting available", "")]
        return [("sacct", "skip", "no accounting: exit codes come from the job's exit code file", "")]

    async def limits(self, transport: Transport) -> dict[str, int]:
        """The site's limits offload plans with (``MaxArraySize``), read once per site."""
        result = await transport.run(["scontrol", "show", "config"], check=False, timeout=60)
        limits: dict[str, int] = {}
        for line in result.stdout.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "MaxArraySize" and value.strip().isdigit():
                limits["max_array_size"] = max(1, int(value.strip()) - 1)  # task ids go up to MaxArraySize-1
        return limits

    async def estimate_start(self, transport: Transport, spec: JobSpec) -> StartEstimate | None:
        """``sbatch --test-only`` with the job's resource options: SLURM plans the job as if it were submitted
        now, submits nothing, and says when and where it would start (sbatch's line "Job 12 to start at
        2026-12-06T21:40:12 using 1 processors on nodes n1 in partition gpu") or why it would refuse it. The
        login node's own ``date`` reads the time (in its zone, as sbatch wrote it), and its clock is "now"."""
        argv = ["sbatch", "--test-only", *self._resource_options(spec), "--wrap=true"]
        script = (
            'out=$(SLURM_TIME_FORMAT=standard "$@" 2>&1); printf "%s\\n" "$out"; '
            """t=$(printf '%s\\n' "$out" | sed -n 's/.* to start at \\([^ ]*\\) .*/\\1/p' | head -n 1); """
            'printf "now=%s\\n" "$(date +%s)"; [ -n "$t" ] && printf "start=%s\\n" "$(date -d "$t" +%s)"; true'
        )
        result = await transport.run(["sh", "-c", script, "sh", *argv], check=False, timeout=60)
        return _start_estimate(result.stdout)

    def job_ids(self, output: str, array_size: int | None) -> list[str]:
        """``--parsable`` prints ``id`` or, on a multi-cluster site, ``id;cluster``: the cluster stays in the id
        (``123;c2``), so every later squeue, sacct and scancel asks that cluster (``--clusters``)."""
        # A site's sbatch wrapper may print a banner or a quota warning around the answer: the job is in all the
        # same, so the answer is looked for among all the lines (the last one, as sbatch prints it last).
        answers = _answers(output)
        if not answers:
            raise ValueError(
                f"sbatch printed {output.strip()!r} instead of a job id (no line of it is a number, 'number;cluster' "
                "or 'Submitted batch job N')"
            )
        first, _, cluster = answers[-1].partition(";")
        suffix = f";{_value('cluster', cluster)}" if cluster else ""
        return [f"{first}_{i}{suffix}" for i in range(array_size)] if array_size else [first + suffix]

    # -- status -----------------------------------------------------------------------------------------

    async def poll(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """A status for every ref, in as few calls as possible: squeue for what slurmctld remembers, then sacct,
        then the job's own exit code file; UNKNOWN for a job none of them knows yet (never a guessed end).

        This is the one place the three answers meet. While squeue lists a job, its word stands. For a job it no
        longer lists, sacct's word stands only if it is final: after a slurmctld state loss, or with slurmdbd
        backlogged, accounting may say RUNNING for ever, while the exit code file the batch script writes last
        says the job ended (and how); without that file, sacct's RUNNING or PENDING stays."""
        statuses: dict[str, JobStatus] = {}
        unsure: set[str] = set()  # not in squeue, and accounting's state is not final
        for cluster, group in _by_cluster(refs).items():
            for start in range(0, len(group), _CHUNK):
                statuses.update(await self._squeue(transport, group[start : start + _CHUNK], cluster))
            missing = [ref for ref in group if ref.id not in statuses]
            for start in range(0, len(missing), _CHUNK):
                accounted = await self._sacct(transport, missing[start : start + _CHUNK], cluster)
                statuses.update(accounted)
                unsure.update(job_id for job_id, status in accounted.items() if not status.state.is_terminal)
        rest = [ref for ref in refs if ref.id not in statuses or ref.id in unsure]
        for start in range(0, len(rest), _CHUNK):
            for job_id, status in (await exit_code_files(transport, rest[start : start + _CHUNK],
                                                         self._accounting)).items():  # fmt: skip
                if job_id not in unsure or status.state.is_terminal:
                    statuses[job_id] = status
        killed = [ref for ref in refs if _killed_outright(statuses.get(ref.id))]
        for cluster, group in _by_cluster(killed).items():
            for start in range(0, len(group), _CHUNK):
                for job_id, words in (await self._over_memory(transport, group[start : start + _CHUNK],
                                                              cluster)).items():  # fmt: skip
                    statuses[job_id] = dataclasses.replace(statuses[job_id], reason=words, cause=EndCause.OUT_OF_MEMORY)
        return statuses

    async def _over_memory(self, transport: Transport, refs: Sequence[JobRef], cluster: str | None) -> dict[str, str]:
        """Which of ``refs`` (ended by SIGKILL) the site killed for their memory, with words saying so.

        A site that enforces memory with cgroups says ``OUT_OF_MEMORY`` itself. One that enforces it by polling
        (``JobAcctGatherParams=OverMemoryKill``) kills the step and leaves ``FAILED``, signal 9, and a reason such
        as ``JobLaunchFailure``: accounting then shows a step whose peak memory reached the job's allocation per
        node, and that is what is reported, as ``OUT_OF_MEMORY``. A step whose record has not reached accounting
        yet is left as the queue said it."""
        if self._accounting is False:
            return {}
        argv = ["sacct", "--noheader", "--parsable2", "--format=JobID,MaxRSS,AllocTRES", *_clusters(cluster),
                "--jobs=" + ",".join(_bare(r.id) for r in refs)]  # fmt: skip
        result = await transport.run(argv, check=False)
        if result.exit_status != 0:
            return {}
        wanted = {_bare(ref.id): ref.id for ref in refs}
        allocated: dict[str, int] = {}
        peak: dict[str, int] = {}
        for line in result.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < 3:
                continue
            job, _, step = fields[0].partition(".")
            tres = dict(item.partition("=")[::2] for item in fields[2].split(",") if "=" in item)
            if not step and job in wanted and tres.get("mem"):
                allocated[job] = _mib(tres["mem"]) // max(1, int(tres.get("node") or 1))
            elif step and fields[1]:
                peak[job] = max(peak.get(job, 0), _mib(fields[1]))
        killed = [job for job in allocated if peak.get(job, 0) >= allocated[job] > 0]
        said = "OUT_OF_MEMORY: a step of the job reached {} MiB of the {} MiB it had per node, and the site killed it"
        return {wanted[job]: said.format(peak[job], allocated[job]) for job in killed}

    async def _squeue(self, transport: Transport, refs: Sequence[JobRef], cluster: str | None) -> dict[str, JobStatus]:
        argv = [
            "squeue", "--noheader", "--array", "--states=all", *_clusters(cluster),
            "--jobs=" + ",".join(_bare(ref.id) for ref in refs),
            "--Format=JobArrayID:|,State:|,Reason:|,exit_code:|,NodeList:|",
        ]  # fmt: skip
        result = await transport.run(argv, check=False)
        if result.exit_status != 0:
            if "Invalid job id" in result.stderr:
                return {}  # none of them is in slurmctld's memory any more
            result.check()
        wanted = {_bare(ref.id): ref.id for ref in refs}
        statuses: dict[str, JobStatus] = {}
        for line in result.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < 5:
                continue
            listed, state, reason, raw_exit, node = (f.strip() for f in fields[:5])
            exit_code = signal = None
            if raw_exit.isdigit():
                exit_code, signal = int(raw_exit) >> 8, (int(raw_exit) & 0x7F) or None
            for job_id in _array_tasks(listed):
                if job_id in wanted:
                    statuses[wanted[job_id]] = _status(state, reason, exit_code, signal, node)
        return statuses

    async def _sacct(self, transport: Transport, refs: Sequence[JobRef], cluster: str | None) -> dict[str, JobStatus]:
        """Ended jobs slurmctld forgot (MinJobAge), from accounting. A failed sacct (slurmdbd down) is retried
        at the next poll; only a site that keeps no accounting at all stops being asked."""
        if self._accounting is False or not refs:
            return {}
        asked = [_bare(r.id) for r in refs]
        # An array cancelled before any task was split off is one record under the array's own id (12, or
        # 12_[0-4]): ``--jobs=12_3`` finds nothing, so the arrays are asked about too.
        arrays = {job_id.split("_", 1)[0] for job_id in asked if "_" in job_id}
        argv = ["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State,ExitCode,NodeList",
                *_clusters(cluster), "--jobs=" + ",".join([*asked, *sorted(arrays)])]  # fmt: skip
        result = await transport.run(argv, check=False)
        if result.exit_status != 0:
            if "accounting storage is disabled" in result.stderr.lower():
                self._accounting = False
                log.info(
                    "site %s keeps no accounting: ended jobs are read from their exit code files", self.config.name
                )
            else:
                log.warning("sacct failed (%s); asking again at the next poll", result.stderr.strip()[:200])
            return {}
        self._accounting = True
        wanted = {_bare(ref.id): ref.id for ref in refs}
        statuses: dict[str, JobStatus] = {}
        whole: dict[str, JobStatus] = {}  # an array's own record, for its tasks that have none of their own
        for line in result.stdout.splitlines():
            fields = line.split("|")
            if len(fields) < 3 or ":" not in fields[2]:
                continue
            code, sig = fields[2].split(":", 1)
            state = fields[1].split()[0] if fields[1] else "UNKNOWN"
            node = fields[3] if len(fields) > 3 and fields[3] != "None assigned" else ""
            status = _status(state, "", int(code), int(sig) or None, node)
            if status.state is JobState.UNKNOWN:
                continue
            if fields[0] in arrays and fields[0] not in wanted:
                whole[fields[0]] = status
                continue
            statuses.update((wanted[job_id], status) for job_id in _array_tasks(fields[0]) if job_id in wanted)
        for job_id, ref_id in wanted.items():
            array = job_id.split("_", 1)[0]
            if "_" in job_id and ref_id not in statuses and array in whole:
                statuses[ref_id] = whole[array]
        return statuses

    async def nodes(self, transport: Transport) -> list[NodeResources]:
        """One ``sinfo`` for every node and partition: GRES and GRES in use, CPUs, memory."""
        argv = ["sinfo", "--noheader", "--Node", "--Format=NodeList:|,Partition:|,StateCompact:|,Gres:|,GresUsed:|,"
                "CPUsState:|,Memory:|,AllocMem:|"]  # fmt: skip
        result = await transport.run(argv)
        found: dict[str, NodeResources] = {}
        for line in result.stdout.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) < 8 or not fields[0]:
                continue
            name, partition, state, gres, used, cpus, memory, alloc_mem = fields[:8]
            partition = partition.rstrip("*")
            if name in found:
                node = found[name]
                found[name] = dataclasses.replace(node, partitions=(*node.partitions, partition))
                continue
            allocated, _idle, _other, total = (int(x) if x.isdigit() else 0 for x in (cpus.split("/") + ["0"] * 4)[:4])
            found[name] = NodeResources(
                name=name, partitions=(partition,), state=state, gpus=_gpu_count(gres), gpus_used=_gpu_count(used),
                cpus=total, cpus_used=allocated, memory_mb=int(memory) if memory.isdigit() else 0,
                memory_used_mb=int(alloc_mem) if alloc_mem.isdigit() else 0,
            )  # fmt: skip
        return list(found.values())

    async def _step_job_id(self, transport: Transport, ref: JobRef) -> str:
        if ";" in ref.id:
            raise ConfigError(
                f"job {ref.id} runs on another cluster of a multi-cluster site: srun cannot reach into it from "
                "here (offload shell and reach need a job of the login node's own cluster)"
            )
        if "_" not in ref.id:
            return ref.id
        # srun wants the array task's own job id
        out = await transport.run(["squeue", "--noheader", f"--jobs={ref.id}", "--Format=JobID"])
        return out.stdout.strip() or ref.id

    async def interactive(self, transport: Transport, ref: JobRef, argv: list[str], pty: bool = True) -> list[str]:
        """A step in the running job, sharing its resources, with a terminal when this side has one."""
        job_id = await self._step_job_id(transport, ref)
        return ["srun", f"--jobid={job_id}", "--overlap", *(["--pty"] if pty else ["--quiet"]), *argv]

    async def step(self, transport: Transport, ref: JobRef, node: str, argv: list[str]) -> list[str] | None:
        """A step of the running job on ``node`` whose stdin/stdout stream through srun, unbuffered (a relay's
        carrier). It overlaps the job's own steps and takes none of their resources."""
        job_id = await self._step_job_id(transport, ref)
        return ["srun", f"--jobid={job_id}", "--overlap", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
                "--unbuffered", "--quiet", "--mem=0", *argv]  # fmt: skip

    @staticmethod
    def first_host(nodelist: str) -> str:
        """The first host of a Slurm node list: ``node[3-5,7],gpu1`` -> ``node3``."""
        first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
        if "[" not in first:
            return first
        prefix, _, rest = first.partition("[")
        return prefix + re.split(r"[-,\]]", rest)[0]

    async def find(self, transport: Transport, name: str) -> list[JobRef]:
        """Jobs of the site's user with this name that slurmctld still knows (queued or recently ended),
        newest first. Their job directory is their working directory (offload submits with --chdir)."""
        # --user of whoever we are: `--me` needs SLURM 20.11 or newer
        argv = ["sh", "-c", 'exec squeue --user="$(id -un)" "$@"', "squeue", "--noheader", "--array", "--states=all",
                f"--name={_value('job name', name)}", "--Format=JobArrayID:|,JobID:|,WorkDir:|"]  # fmt: skip
        result = (await transport.run(argv)).stdout
        refs = []
        for line in result.splitlines():
            fields = [f.strip() for f in line.split("|")]
            if len(fields) >= 3 and fields[0]:
                array_id, raw_id, workdir = fields[:3]
                index = int(array_id.split("_")[1]) if "_" in array_id else None
                refs.append((int(raw_id) if raw_id.isdigit() else 0, JobRef(array_id, workdir, index)))
        return [ref for _, ref in sorted(refs, key=lambda pair: pair[0], reverse=True)]

    async def queued_in(self, transport: Transport, jobdirs: Sequence[str]) -> list[JobRef]:
        """The user's jobs still queued or running whose working directory is one of ``jobdirs``, in one squeue
        whatever their number: every submission has a job directory of its own (offload submits with --chdir),
        so this is what a batch whose answers were lost really got in. Arrays come as their base id. Only the
        login node's own cluster is asked (a job sent elsewhere is found by its jobid file)."""
        wanted = set(jobdirs)
        # --user of whoever we are: `--me` needs SLURM 20.11 or newer
        argv = ["sh", "-c", 'exec squeue --user="$(id -un)" "$@"', "squeue", "--noheader",
                "--Format=ArrayJobID:|,WorkDir:|"]  # fmt: skip
        result = await transport.run(argv, timeout=120)
        found: dict[str, JobRef] = {}
        for line in result.stdout.splitlines():
            job_id, _, rest = line.partition("|")
            workdir = rest.rstrip().removesuffix("|").strip()
            if job_id.strip().isdigit() and workdir in wanted:
                found.setdefault(job_id.strip(), JobRef(job_id.strip(), workdir))
        return list(found.values())

    async def cancel(self, transport: Transport, refs: Sequence[JobRef]) -> None:
        for cluster, group in _by_cluster(refs).items():
            await self._cancel(transport, group, cluster)

    async def _cancel(self, transport: Transport, refs: Sequence[JobRef], cluster: str | None) -> None:
        for start in range(0, len(refs), _CHUNK):
            chunk = refs[start : start + _CHUNK]
            result = await transport.run(["scancel", *_clusters(cluster), *(_bare(ref.id) for ref in chunk)],
                                         check=False)  # fmt: skip
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


def _gpu_count(gres: str) -> int:
    """GPUs in a GRES string: ``gpu:2``, ``gpu:a100:4(S:0-1)``, ``gpu:1(IDX:0),shard:0`` -> 2, 4, 1."""
    total = 0
    for item in re.split(r",(?![^(]*\))", gres):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _more_nodes(gpus: int, capacity: int, gpu_request: str) -> str:
    nodes = -(-gpus // capacity)
    if gpus % nodes == 0:
        each = gpus // nodes
        return (f"ask for {nodes} nodes with {each} GPUs each (Resources(nodes={nodes}, gpus_per_node={each}); "
                f"CLI: --nodes {nodes} --gpus-per-node {each})")  # fmt: skip
    if gpu_request == "--gpus":
        return f"ask for {nodes} nodes (Resources(nodes={nodes}, gpus={gpus}); CLI: --nodes {nodes} --gpus {gpus})"
    each = -(-gpus // nodes)
    return (f"ask for {nodes} nodes with {each} GPUs each, {nodes * each} in all (Resources(nodes={nodes}, "
            f"gpus_per_node={each}); CLI: --nodes {nodes} --gpus-per-node {each})")  # fmt: skip


def _status(state: str, reason: str, exit_code: int | None, signal: int | None, node: str) -> JobStatus:
    base = state.split()[0].rstrip("+") if state else "UNKNOWN"
    mapped = STATES.get(base, JobState.UNKNOWN)
    if mapped is JobState.UNKNOWN:
        log.warning("unknown SLURM state %r", state)
    if reason in ("None", "(null)"):
        reason = ""
    cause = _CAUSES.get(base)
    if base in ("NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED", "DEADLINE", "REVOKED"):
        # SLURM's own word says more than the state offload maps it to: keep it in front of the reason
        same = reason.lower().replace("_", "") == base.lower().replace("_", "")
        reason = base if same or not reason else f"{base}: {reason}"
    if not mapped.is_terminal:
        exit_code = signal = None
    elif exit_code == 0 and base != "COMPLETED":
        exit_code = None  # a job killed (cancelled, timed out, its node lost) has no exit code of its own
    stuck = mapped is JobState.PENDING and _never_clears(reason)
    return JobStatus(mapped, reason, exit_code, node, signal, cause, stuck)


# Pending reasons that no other job's end clears: the job itself exceeds a limit (SLURM names those *PerJob*), or
# asks for what the cluster will not give it. An admin may change the limit; the job alone never starts.
_NEVER_CLEARS = ("PerJob", "PartitionTimeLimit", "PartitionNodeLimit", "PartitionConfig", "InvalidAccount",
                 "InvalidQOS", "AccountNotAllowed", "QOSNotAllowed", "BadConstraints",
                 "DependencyNeverSatisfied")  # fmt: skip


def _never_clears(reason: str) -> bool:
    return any(word in reason for word in _NEVER_CLEARS)


# SLURM plans a job behind others with no time limit (a partition's MaxTime=INFINITE) a year out: no plan at all
_NO_PLAN = 300 * 86400
_PLANNED = re.compile(r"to start at \S+ using \d+ processors (on nodes \S+ in partition \S+)")


def _start_estimate(output: str) -> StartEstimate | None:
    """What ``estimate_start``'s command printed, read: sbatch's plan (seconds from the login node's now), or
    its refusal, or None if it said neither (an sbatch that cannot plan, a wrapper that hides it)."""
    values = dict(line.split("=", 1) for line in output.splitlines() if line.startswith(("now=", "start=")))
    planned = _PLANNED.search(output)
    if values.get("start", "").isdigit() and values.get("now", "").isdigit():
        wait = max(0, int(values["start"]) - int(values["now"]))
        if wait >= _NO_PLAN:  # what it says when the jobs ahead have no time limit: it cannot tell
            return StartEstimate(None)
        return StartEstimate(float(wait), where=planned.group(1) if planned else "")
    for line in output.splitlines():
        if "error:" in line:
            return StartEstimate(None, refused=line.split("error:", 1)[1].strip())
    return None


def _killed_outright(status: JobStatus | None) -> bool:
    """A job that failed by SIGKILL (its own, or its payload's as a shell reports it: 137; Slurm's polling memory
    kill may leave the batch shell alive to say so) with no word from the scheduler on why."""
    if status is None or status.state is not JobState.FAILED or status.cause is not None:
        return False
    return status.signal == 9 or status.exit_code in (9, 137)


def _mib(size: str) -> int:
    """sacct's sizes (``211549K``, ``50M``, ``1.50G``) in MiB; 0 for none (``0``, empty) or no size."""
    try:
        return parse_memory(size) or 0 if size.strip()[-1:].isalpha() else 0
    except ConfigError:
        return 0


def _answers(text: str) -> list[str]:
    """The ids (``123`` or ``123;cluster``) of the lines of ``text`` that are sbatch answers, in order."""
    found = []
    for line in text.splitlines():
        match = _ANSWER.fullmatch(line.strip())
        if match:
            number, cluster = (match[1], match[2]) if match[1] else (match[3], match[4])
            found.append(f"{number};{cluster}" if cluster else number)
    return found


def _array_tasks(listed: str) -> list[str]:
    """The job ids one line of squeue or sacct stands for: ``123_[0-3,7%2]`` (array tasks that never started,
    one record for all of them, as SLURM keeps a pending array) -> ``123_0`` ... ``123_3``, ``123_7``; any other
    id as it is. A cancelled array whose tasks never ran is only ever that one record in accounting."""
    match = _TASK_RANGE.fullmatch(listed)
    if match is None:
        return [listed]
    tasks: list[str] = []
    for part in match[2].split("%", 1)[0].split(","):
        first, _, last = part.partition("-")
        if first.isdigit() and (not last or last.isdigit()):
            tasks += [f"{match[1]}_{i}" for i in range(int(first), int(last or first) + 1)]
    return tasks


def _bare(job_id: str) -> str:
    """``123_4;cluster`` -> ``123_4``: the id without the cluster of a multi-cluster site."""
    return job_id.split(";", 1)[0]


def _by_cluster(refs: Sequence[JobRef]) -> dict[str | None, list[JobRef]]:
    groups: dict[str | None, list[JobRef]] = {}
    for ref in refs:
        groups.setdefault(ref.id.split(";", 1)[1] if ";" in ref.id else None, []).append(ref)
    return groups


def _clusters(cluster: str | None) -> list[str]:
    return [f"--clusters={_value('cluster', cluster)}"] if cluster else []
