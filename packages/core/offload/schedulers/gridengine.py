"""Grid Engine (Son of Grid Engine 8.1, as Debian ships it; the same commands as Univa/Altair's): ``qsub -terse``
(``-t`` arrays for identical jobs), one ``qstat -xml`` per poll, ``qacct -j`` for ended jobs, one ``qdel``.

A job's state comes from qstat while the qmaster holds it, then from accounting (``qacct``), then from the exit
code file the batch script writes. A job qdel'd before it started leaves no accounting record: :meth:`cancel`
leaves a ``cancelled`` mark in its directory once qdel accepted it, and that mark (with qstat no longer listing
the job) is what says CANCELLED. Anything else stays UNKNOWN, never guessed.

Arrays: Grid Engine numbers tasks from 1, offload from 0; task ``i`` of offload is ``JOBID.(i+1)``.

GPUs: Grid Engine counts GPUs as a consumable complex (``-l gpu=N``, per slot) but binds none: it sets no
``CUDA_VISIBLE_DEVICES``. offload does not invent one either; a job sees the GPUs the node's prolog (or the site's
own wrapper) gives it, as on the site without offload.

Multi-node jobs need a parallel environment with ``allocation_rule 1`` and ``control_slaves TRUE`` (profile key
``parallel_environment``): every job is submitted in it (one slot per node), so ``qrsh -inherit`` can start the
copies of a multi-node job, a shell in a running job (``offload shell``), or a reach relay.
"""

from __future__ import annotations

import logging
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from offload.config import SiteConfig
from offload.errors import ConfigError, RemoteCommandError
from offload.jobs import JobRef, JobState, JobStatus
from offload.schedulers.base import (
    NodeResources,
    Scheduler,
    Shell,
    exit_code_files,
    read_answer,
    secrets_sweep,
)
from offload.sizes import parse_size
from offload.spec import JobSpec, Resources, parse_walltime
from offload.transports.base import Transport

log = logging.getLogger("offload.gridengine")

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.,:@%+=/-]+$")
# qsub -terse answers "123" for a job, "123.1-4:1" for an array
_ANSWER = re.compile(r"(\d+)(?:\.(\d+)-(\d+):(\d+))?")
# Shell lines that set id from one $line of a jobid file, if the line is qsub -terse's answer (123, 123.1-4:1)
_PARSE_ANSWER = '        line=${line%%.*}\n        case "$line" in ""|*[!0-9]*) ;; *) id=$line ;; esac\n'
_CHUNK = 200  # job ids per qacct/qdel call
_ME = 'exec "$0" -u "$(id -un)" "$@"'  # run a command with -u <whoever we are>
# qstat's state letters that say the job is suspended, held, in error or being deleted (else: waiting/running)
_SUSPENDED, _HELD, _ERROR, _DELETING = "sST", "h", "E", "d"
_NOT_TAKING = set("udECsSDc")  # queue instance states: unknown, disabled, error, calendar/subordinate suspended
_ID = re.compile(r"(\d+)(?:\.(\d+))?")


def _value(option: str, value: object) -> str:
    text = str(value)
    if not _SAFE_VALUE.match(text):
        raise ConfigError(f"{option} {text!r} contains characters Grid Engine does not accept (spaces, quotes, ...)")
    return text


def _split(job_id: str) -> tuple[str, int | None]:
    """``'123.4'`` -> ``('123', 4)``; ``'123'`` -> ``('123', None)``."""
    match = _ID.fullmatch(job_id.strip())
    if not match:
        raise ConfigError(f"{job_id!r} is not a Grid Engine job id (NUMBER or NUMBER.TASK)")
    return match[1], int(match[2]) if match[2] else None


class GridEngineScheduler(Scheduler):
    name = "gridengine"
    supports_arrays = True
    reserves_cpus = False  # one slot per node (the parallel environment's allocation_rule 1): directives() says so
    # the batch script's first lines set offload_ge_task (0-based) for an array task; unset for a single job
    task_index = "${offload_ge_task:-}"
    profile_keys = {"parallel_environment": str, "gpu_resource": str}
    commands = ("qsub", "qstat", "qdel", "qacct", "qhost")
    # What Grid Engine tells a job that its payload may need inside the container.
    job_env = ("JOB_ID", "JOB_NAME", "SGE_TASK_ID", "SGE_TASK_FIRST", "SGE_TASK_LAST", "NSLOTS", "NHOSTS",
               "PE_HOSTFILE", "QUEUE", "HOSTNAME")  # fmt: skip

    # Each copy of a multi-node job: the launcher below passes its rank in OFFLOAD_GE_* variables.
    copy_env = {
        "RANK": "$OFFLOAD_GE_RANK",
        "NODE_RANK": "$OFFLOAD_GE_NODE_RANK",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "$OFFLOAD_GE_WORLD_SIZE",
        "LOCAL_WORLD_SIZE": "1",
    }
    first_node = '$(head -n 1 "$PE_HOSTFILE" | cut -d" " -f1)'

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        self.pe = str(config.scheduler_keys.get("parallel_environment") or "")
        self.gpu_resource = _value("gpu_resource", config.scheduler_keys.get("gpu_resource") or "gpu")

    # -- rendering --------------------------------------------------------------------------------------

    def directives(
        self, spec: JobSpec, jobdir: str, array_size: int | None, parallelism: int | None = None
    ) -> list[str]:
        site, res = self.config, spec.resources
        if any(c in jobdir for c in "\n \"'$"):
            raise ConfigError(f"the site's workdir {jobdir!r} has spaces, quotes or $, which #$ lines cannot hold")
        interpreter = shlex.split(site.shebang[2:])[0] if site.shebang[2:].strip() else "/bin/bash"
        own = [f"-N {_value('job name', spec.name or 'offload')}", f"-wd {jobdir}", "-j y", f"-S {interpreter}"]
        if array_size:
            # Grid Engine's -o cannot say TASK_ID-1: its own messages go to output.ge.TASK_ID, the script's output
            # to output.<offload index> (the exec line after the directives).
            own += [f"-o {jobdir}/output.ge.$TASK_ID", f"-t 1-{array_size}"]
            if parallelism:
                own.append(f"-tc {parallelism}")
        else:
            own.append(f"-o {jobdir}/output")
        if spec.secrets or spec.reach:
            own.append("-r n")  # the job removes its secrets once read: a rerun would start without them
        opts: list[str] = []
        if (res.tasks_per_node or 1) > 1 or (res.cpus or 1) > 1:
            raise ConfigError(
                "Grid Engine gives offload one slot per node (a parallel environment with allocation_rule 1): "
                "ask for nodes, not tasks_per_node or cpus, or pass the site's own -pe in scheduler_options"
            )
        if self.pe:
            opts.append(f"-pe {_value('parallel_environment', self.pe)} {res.nodes}")
        elif res.nodes > 1:
            raise ConfigError(
                f"a job on {res.nodes} nodes needs a parallel environment: set parallel_environment in site "
                f"'{site.name}' (one with allocation_rule 1 and control_slaves TRUE; qconf -spl lists them)"
            )
        gpus = res.total_gpus
        queue = res.partition or (site.gpu_partition if gpus and site.gpu_partition else site.partition)
        if queue:
            opts.append(f"-q {_value('queue', queue)}")
        if gpus:
            per_node = res.gpus_per_node if res.gpus_per_node is not None else -(-gpus // res.nodes)
            if per_node * res.nodes != gpus and res.gpus_per_node is None:
                raise ConfigError(f"{gpus} GPUs cannot be split evenly over {res.nodes} nodes: ask for gpus_per_node")
            if site.gpus_per_node is not None and per_node > site.gpus_per_node:
                raise ConfigError(f"{per_node} GPUs per node asked, but site '{site.name}' has {site.gpus_per_node}")
            opts.append(f"-l {self.gpu_resource}={per_node}")  # per slot, and a slot is a node
        if res.memory_mb:
            opts.append(f"-l mem_free={res.memory_mb}M")
        walltime = res.walltime_seconds or parse_walltime(site.walltime)
        if walltime:
            opts.append(f"-l h_rt={walltime}")
        if res.account or site.account:
            opts.append(f"-P {_value('project', res.account or site.account)}")
        opts = [o for o in opts if not any(skip in o for skip in res.skip)]
        for option in (*site.scheduler_options, *res.extra):
            if "\n" in option:
                raise ConfigError(f"scheduler option {option!r} contains a newline")
            opts.append(option)
        lines = [f"#$ {o}" for o in (*own, *opts)]
        if array_size:
            lines += [
                "offload_ge_task=$((SGE_TASK_ID - 1))",
                f'exec > {shlex.quote(jobdir)}/output."$offload_ge_task" 2>&1',
            ]
        return lines

    def launcher(self, res: Resources) -> list[str]:
        """One copy per host of the job's parallel environment, each started with ``qrsh -inherit`` (so Grid
        Engine accounts and kills it with the job). The first copy that fails stops the others.

        ``qrsh -inherit`` passes no environment (srun passes all of it), so the job's is sent to each copy on its
        standard input (not in a file: a secret never goes back to disk) and set there first; what belongs to the
        host a copy runs on (its name, its job TMPDIR, Grid Engine's own variables) is left as that host has it."""
        script = (
            'rank=0; pids=""; command=$(printf "%q " "$@"); '
            'size=$(wc -l < "$PE_HOSTFILE"); '
            "environment=$(for v in $(compgen -e); do case $v in "
            'HOSTNAME|HOST|PWD|OLDPWD|SHLVL|TMPDIR|TMP|_|SGE_*|BASH_FUNC_*) ;; *) declare -p "$v" ;; esac; done); '
            "while read -r host _; do "
            'printf "%s\\n" "$environment" | qrsh -inherit "$host" "eval \\"\\$(cat)\\"; '
            'export OFFLOAD_GE_RANK=$rank OFFLOAD_GE_NODE_RANK=$rank OFFLOAD_GE_WORLD_SIZE=$size; $command" & '
            'pids="$pids $!"; rank=$((rank + 1)); '
            'done < "$PE_HOSTFILE"; '
            'status=0; while [ -n "$pids" ]; do wait -n -p done $pids; rc=$?; '
            'pids=$(printf "%s\\n" $pids | grep -vx "$done" | tr "\\n" " " | sed "s/ *$//"); '
            'if [ "$rc" != 0 ] && [ "$status" = 0 ]; then status=$rc; [ -n "$pids" ] && kill $pids 2>/dev/null; fi; '
            'done; exit "$status"'
        )
        return ["bash", "-c", script, "offload-launch"]

    def submit_line(self, script_path: str) -> str:
        return f"qsub -terse {script_path}"

    def abandon_line(self) -> str:
        # qdel'd while pending leaves no accounting record: the marks cancel() leaves say how it ended
        return read_answer("a", _PARSE_ANSWER) + (
            '    [ -n "$id" ] && qdel "$id" && { : > "$a/cancelled"; i=0; '
            'while [ "$i" -lt "$n" ]; do : > "$a/cancelled.$i"; i=$((i + 1)); done; }\n'
        )

    def sweep_lines(self, jobs_dir: str) -> list[str]:
        return secrets_sweep(jobs_dir, """qstat -u "$(id -un)" | awk 'NR > 2 {print $1}'""", _PARSE_ANSWER)

    def ids_in(self, text: str) -> list[str]:
        """Job numbers in qsub's answers (jobid files read back after a lost channel); a whole array as one."""
        return [match[1] for line in text.splitlines() if (match := _ANSWER.fullmatch(line.strip()))]

    def explain(self, message: str) -> str:
        lowered = message.lower()
        if "parallel environment" in lowered or "queue" in lowered or "project" in lowered:
            return (f"Check partition (the queue), parallel_environment and account (the project) of site "
                    f"'{self.config.name}': qconf -sql, qconf -spl and qconf -sprjl list them.\n")  # fmt: skip
        if "max_aj_tasks" in lowered or "array" in lowered:
            return "The array is larger than the site allows (max_aj_tasks in qconf -sconf).\n"
        return f"Check the resources against the site's hosts ('offload sites gpus {self.config.name}').\n"

    async def limits(self, transport: Transport) -> dict[str, int]:
        """``max_aj_tasks`` of the global configuration: the most tasks one array may have (0: no limit)."""
        result = await transport.run(["qconf", "-sconf"], check=False, timeout=60)
        for line in result.stdout.splitlines():
            key, _, value = line.strip().partition(" ")
            if key == "max_aj_tasks" and value.strip().isdigit() and int(value) > 0:
                return {"max_array_size": int(value)}
        return {}

    def job_ids(self, output: str, array_size: int | None) -> list[str]:
        """``-terse`` prints ``123`` or, for an array, ``123.1-N:1``: task ``i`` of offload is ``123.(i+1)``."""
        answers = [m for line in output.splitlines() if (m := _ANSWER.fullmatch(line.strip()))]
        if not answers:
            raise ValueError(f"qsub printed {output.strip()!r} instead of a job id (NUMBER or NUMBER.FIRST-LAST:STEP)")
        number = answers[-1][1]
        return [f"{number}.{i + 1}" for i in range(array_size)] if array_size else [number]

    # -- status -----------------------------------------------------------------------------------------

    async def poll(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """One ``qstat -xml`` for every job the qmaster holds, then ``qacct -j`` (in one command) for the ones it
        no longer does, then the jobs' exit code files and cancel marks; UNKNOWN for the rest."""
        result = await transport.run(["sh", "-c", _ME, "qstat", "-xml"], check=False)
        result.check()
        listed = parse_qstat(result.stdout)
        statuses: dict[str, JobStatus] = {}
        for ref in refs:
            number, task = _split(ref.id)
            found = listed.get((number, task)) or listed.get((number, None))
            if found:
                statuses[ref.id] = found
        gone = [ref for ref in refs if ref.id not in statuses]
        numbers = sorted({_split(ref.id)[0] for ref in gone}, key=int)
        accounted: dict[tuple[str, int | None], JobStatus] = {}
        for start in range(0, len(numbers), _CHUNK):
            accounted.update(await self._qacct(transport, numbers[start : start + _CHUNK]))
        marks = await self._cancel_marks(transport, gone)
        rest = []
        for ref in gone:
            number, task = _split(ref.id)
            status = accounted.get((number, task))
            if status and ref.id in marks and status.state is not JobState.COMPLETED:
                status = JobStatus(JobState.CANCELLED, "cancelled with qdel", None, status.node, status.signal)
            if status:
                statuses[ref.id] = status
            elif ref.id in marks:
                statuses[ref.id] = JobStatus(JobState.CANCELLED, "cancelled with qdel before it started")
            else:
                rest.append(ref)
        if rest:
            statuses.update(await exit_code_files(transport, rest))
        return statuses

    async def _qacct(self, transport: Transport, numbers: Sequence[str]) -> dict[tuple[str, int | None], JobStatus]:
        """Accounting records of ended jobs, one qacct per job in one remote command (a job not yet in the
        accounting file, flushed every few seconds, is simply missing)."""
        if not numbers:
            return {}
        script = 'for j in "$@"; do qacct -j "$j" 2>/dev/null; done; true'
        result = await transport.run(["sh", "-c", script, "qacct", *numbers], check=False)
        return parse_qacct(result.stdout)

    async def _cancel_marks(self, transport: Transport, refs: Sequence[JobRef]) -> set[str]:
        with_dirs = [ref for ref in refs if ref.jobdir]
        if not with_dirs:
            return set()
        script = 'for f in "$@"; do [ -e "$f" ] && printf "%s\\n" "$f"; done; true'
        result = await transport.run(["sh", "-c", script, "sh", *(_mark(ref) for ref in with_dirs)], check=False)
        present = set(result.stdout.splitlines())
        return {ref.id for ref in with_dirs if _mark(ref) in present}

    async def nodes(self, transport: Transport) -> list[NodeResources]:
        """One command: ``qhost -xml -q`` (hosts, their queues' slots and states, the GPU consumable left) and
        each exec host's configured GPU count (``qconf -se``), since qhost shows only what is left."""
        script = (
            f"qhost -xml -q -F {shlex.quote(self.gpu_resource)} && echo OFFLOAD-GE-HOSTS && "
            'for h in $(qconf -sel); do qconf -se "$h"; done'
        )
        result = await transport.run(["sh", "-c", script])
        xml_text, _, hosts_text = result.stdout.partition("OFFLOAD-GE-HOSTS")
        return parse_qhost(xml_text, parse_capacities(hosts_text, self.gpu_resource), self.gpu_resource)

    async def _host_of(self, transport: Transport, ref: JobRef) -> str:
        status = (await self.poll(transport, [ref])).get(ref.id)
        if status is None or status.state is not JobState.RUNNING or not status.node:
            raise ConfigError(f"job {ref.id} is not running ({status.describe() if status else 'unknown'})")
        return status.node

    def _inherit(self, ref: JobRef, host: str, argv: list[str], extra: list[str]) -> list[str]:
        if not self.pe:
            raise ConfigError(
                f"reaching into a running Grid Engine job takes qrsh -inherit, which needs the job in a parallel "
                f"environment: set parallel_environment in site '{self.config.name}'"
            )
        number, task = _split(ref.id)
        # qrsh -inherit joins its arguments into one shell command line: the argv goes as one quoted line
        return ["env", f"JOB_ID={number}", f"SGE_TASK_ID={task if task is not None else 'undefined'}",
                "qrsh", "-inherit", *extra, host, shlex.join(argv)]  # fmt: skip

    async def interactive(self, transport: Transport, ref: JobRef, argv: list[str], pty: bool = True) -> list[str]:
        """A task of the running job on its first host (``qrsh -inherit``), sharing its allocation."""
        host = await self._host_of(transport, ref)
        return self._inherit(ref, host, argv, ["-pty", "y"] if pty else ["-pty", "n"])

    async def step(self, transport: Transport, ref: JobRef, node: str, argv: list[str]) -> list[str] | None:
        """A task of the running job on ``node`` whose stdin/stdout stream through qrsh (a relay's carrier)."""
        return self._inherit(ref, node, argv, ["-pty", "n"])

    @staticmethod
    def first_host(nodelist: str) -> str:
        return nodelist.split(",")[0].strip()

    async def find(self, transport: Transport, name: str) -> list[JobRef]:
        """Jobs of the site's user with this name that the qmaster still holds, newest first, with their job
        directory (offload submits with -wd). ``qstat -j NAME`` answers for every job of that name."""
        result = await transport.run(["qstat", "-xml", "-j", _value("job name", name)], check=False)
        me = (await transport.run(["id", "-un"])).stdout.strip()
        return parse_qstat_j(result.stdout, me)

    async def cancel(self, transport: Transport, refs: Sequence[JobRef]) -> None:
        """qdel every ref (array tasks as ``N -t T``, in one command), then mark each ref's directory cancelled
        for the ones qdel accepted: a job deleted while pending has no accounting record to say so later."""
        for start in range(0, len(refs), _CHUNK):
            chunk = refs[start : start + _CHUNK]
            ids = []
            for ref in chunk:
                number, task = _split(ref.id)
                ids.append(f"{number}.{task}" if task is not None else number)
            marks = [_mark(ref) for ref in chunk if ref.jobdir]
            # qdel takes JOB.TASK; marks only after it answered, for the jobs it did not call unknown
            script = (
                'n=$1; shift; ids=""; i=0; for a in "$@"; do i=$((i + 1)); [ "$i" -le "$n" ] && ids="$ids $a"; done; '
                'out=$(qdel $ids 2>&1); rc=$?; printf "%s\\n" "$out"; '
                'i=0; for a in "$@"; do i=$((i + 1)); [ "$i" -gt "$n" ] && : > "$a"; done; exit $rc'
            )
            result = await transport.run(["sh", "-c", script, "qdel", str(len(ids)), *ids, *marks], check=False)
            if result.exit_status != 0:
                alive = [s for s in (await self.poll(transport, chunk)).values() if not s.state.is_terminal]
                if alive:
                    raise RemoteCommandError(
                        f"qdel failed and {len(alive)} job(s) are still queued or running: "
                        f"{(result.stdout + result.stderr).strip()}",
                        argv=list(result.argv),
                        exit_status=result.exit_status,
                        stderr=result.stderr,
                    )

    async def doctor_checks(self, transport: Transport, shell: Shell) -> list[tuple[str, str, str, str]]:
        """Grid Engine's own checks for ``offload doctor``: accounting readable, the parallel environment there."""
        checks = []
        # a job name nobody uses: "not found" once the accounting file is readable, "can't open" where it is not
        result = await transport.run(["sh", "-c", "qacct -j offload-doctor-probe 2>&1 | head -n 1"], check=False)
        readable = "not found" in result.stdout
        checks.append(("qacct", "ok", "accounting readable", "") if readable else
                      ("qacct", "skip", f"no accounting ({result.stdout.strip()[:100]}): exit codes come from the "
                       "job's exit code file", ""))  # fmt: skip
        if self.pe:
            pes = (await transport.run(["qconf", "-spl"], check=False)).stdout.split()
            checks.append(("parallel environment", "ok", self.pe, "") if self.pe in pes else
                          ("parallel environment", "fail", f"{self.pe!r} is not one of {', '.join(pes) or 'none'}",
                           "set parallel_environment to one qconf -spl lists"))  # fmt: skip
        return checks


def _mark(ref: JobRef) -> str:
    suffix = f".{ref.index}" if ref.index is not None else ""
    return f"{ref.jobdir}/cancelled{suffix}"


def _tasks(text: str) -> list[int]:
    """Task ids of qstat's ``tasks`` field: ``3``, ``4-10:1``, ``1,3,5-7:2``."""
    found: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+)(?::(\d+))?)?", part.strip())
        if match:
            first, last, step = int(match[1]), int(match[2] or match[1]), int(match[3] or 1)
            found += range(first, last + 1, step)
    return found


def _state(letters: str, queue: str) -> JobStatus:
    """A qstat state (``r``, ``qw``, ``hqw``, ``Eqw``, ``dr``, ``s``...) as offload's, with qstat's word kept."""
    host = queue.partition("@")[2]
    if _ERROR in letters:
        return JobStatus(JobState.PENDING, f"error state {letters}: qstat -j says why; qmod -cj clears it",
                         stuck=True)  # fmt: skip
    if any(c in letters for c in _SUSPENDED):
        return JobStatus(JobState.PENDING, f"suspended ({letters})", node=host)
    running = any(c in letters for c in "rtR") and "q" not in letters
    reason = "being deleted" if _DELETING in letters else ("held" if _HELD in letters else "")
    if running:
        return JobStatus(JobState.RUNNING, reason, node=host)
    return JobStatus(JobState.PENDING, reason or "waiting")


def parse_qstat(text: str) -> dict[tuple[str, int | None], JobStatus]:
    """``qstat -xml``: every job (and array task) listed, keyed by ``(number, task)``; pending task ranges are
    expanded; a job with no tasks is keyed with task None."""
    found: dict[tuple[str, int | None], JobStatus] = {}
    if not text.strip():
        return found
    for job in ET.fromstring(text).iter("job_list"):
        number = job.findtext("JB_job_number", "").strip()
        letters = job.findtext("state", "").strip()
        status = _state(letters, job.findtext("queue_name", "") or "")
        tasks = job.findtext("tasks")
        for task in _tasks(tasks) if tasks else [None]:
            found[(number, task)] = status
    return found


def parse_qacct(text: str) -> dict[tuple[str, int | None], JobStatus]:
    """``qacct -j`` records, keyed by ``(number, task)``. ``failed`` 0 is the script's own end (its exit status
    is the payload's); 37 is the qmaster enforcing h_rt; 100 with a signal is a kill (qdel, or h_rt where the
    execd enforced it: ``ru_wallclock`` reached it); any other ``failed`` is Grid Engine failing to start the job,
    with its reason."""
    found: dict[tuple[str, int | None], JobStatus] = {}
    for block in re.split(r"^=+$", text, flags=re.M):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, _, value = line.partition(" ")
            if key:
                fields[key] = value.strip()
        number = fields.get("jobnumber", "")
        if not number.isdigit():
            continue
        task = int(fields["taskid"]) if fields.get("taskid", "").isdigit() else None
        failed_text = fields.get("failed", "0")
        failed = int(failed_text.split()[0]) if failed_text.split() and failed_text.split()[0].isdigit() else 0
        exit_text = fields.get("exit_status", "0").split()
        code = int(exit_text[0]) if exit_text and exit_text[0].isdigit() else None
        host = fields.get("hostname", "")
        if failed == 0:
            state = JobState.COMPLETED if code == 0 else JobState.FAILED
            signal = code - 128 if code is not None and code > 128 else None
            found[(number, task)] = JobStatus(state, "" if code == 0 else "NonZeroExitCode", code, host, signal)
            continue
        signal = code - 128 if code is not None and code > 128 else None
        limit = _h_rt(fields.get("category", ""))
        wall = _seconds(fields.get("ru_wallclock", ""))
        if failed == 37 or (failed == 100 and limit and wall is not None and wall >= limit):
            # 37: the qmaster enforced h_rt (or h_cpu, h_vmem: its words are kept)
            reason = f"h_rt={limit} reached" if failed == 100 else f"failed {failed_text}"
            found[(number, task)] = JobStatus(JobState.TIMEOUT, reason, None, host, signal)
        elif failed == 100:
            found[(number, task)] = JobStatus(JobState.FAILED, "killed (failed 100: assumedly after job)", None, host,
                                              signal)  # fmt: skip
        else:
            found[(number, task)] = JobStatus(JobState.FAILED, f"failed {failed_text}", None, host)
    return found


def _h_rt(category: str) -> int | None:
    match = re.search(r"h_rt=(\d+)", category)
    return int(match[1]) if match else None


def _seconds(text: str) -> float | None:
    match = re.fullmatch(r"([\d.]+)s?", text.strip())
    return float(match[1]) if match else None


def _mb(text: str) -> int:
    """qhost's memory (``23.5G``, ``512.0M``, a bare number of bytes; ``-`` is 0) in MiB."""
    try:
        return parse_size(text) // 2**20
    except ValueError:
        return 0


def parse_capacities(text: str, resource: str) -> dict[str, int]:
    """Each exec host's configured amount of ``resource`` from ``qconf -se`` output (several hosts in a row)."""
    capacities: dict[str, int] = {}
    host = ""
    for line in re.sub(r"\\\n\s*", "", text).splitlines():  # qconf continues long values with a backslash
        key, _, value = line.strip().partition(" ")
        if key == "hostname":
            host = value.strip()
        elif key == "complex_values" and host:
            match = re.search(rf"(?:^|,)\s*{re.escape(resource)}=(\d+)", value.strip())
            capacities[host] = int(match[1]) if match else 0
    return capacities


def parse_qhost(text: str, capacities: dict[str, int], resource: str) -> list[NodeResources]:
    """``qhost -xml -q -F gpu``: each exec host, its queues (as partitions), the GPUs left of ``capacities``."""
    nodes = []
    for host in ET.fromstring(text).iter("host"):
        name = host.get("name", "")
        if name == "global":
            continue
        values = {v.get("name"): (v.text or "").strip() for v in host.iter("hostvalue")}
        left = next((v.text for v in host.iter("resourcevalue") if v.get("name") == resource), None)
        queues, states, used, slots = [], [], 0, 0
        for queue in host.iter("queue"):
            queues.append(queue.get("name", ""))
            qvalues = {v.get("name"): (v.text or "").strip() for v in queue.iter("queuevalue")}
            states.append(qvalues.get("state_string", ""))
            used += int(qvalues.get("slots_used", "0") or 0)
            slots += int(qvalues.get("slots", "0") or 0)
        gpus = capacities.get(name, 0)
        gpus_left = int(float(left)) if left not in (None, "", "-") else gpus
        state = ",".join(s for s in states if s) or ("-" if values.get("load_avg", "-") == "-" else "ok")
        reporting = values.get("load_avg", "-") != "-"
        takes = reporting and any(not (_NOT_TAKING & set(s)) for s in states)
        cpus = int(values["num_proc"]) if values.get("num_proc", "").isdigit() else slots
        nodes.append(NodeResources(
            name=name, partitions=tuple(queues), state=state, gpus=gpus, gpus_used=max(0, gpus - gpus_left),
            cpus=cpus, cpus_used=min(used, cpus), memory_mb=_mb(values.get("mem_total", "")),
            memory_used_mb=_mb(values.get("mem_used", "")), takes_jobs=takes,
        ))  # fmt: skip
    return nodes


def parse_qstat_j(text: str, user: str) -> list[JobRef]:
    """``qstat -xml -j NAME``: the user's jobs of that name, newest first, each array task as its own ref."""
    refs: list[tuple[int, JobRef]] = []
    if not text.strip():
        return []
    root = ET.fromstring(text)
    for job in root.iter("element"):
        number = job.findtext("JB_job_number")
        if not number or job.findtext("JB_owner") != user:
            continue
        workdir = job.findtext("JB_cwd") or ""
        structure = job.find("JB_ja_structure")
        is_array = job.findtext("JB_ja_structure/element/RN_max") not in (None, "1") or job.findtext(
            "JB_ja_structure/task_id_range/RN_max") not in (None, "1")  # fmt: skip
        if structure is None or not is_array:
            refs.append((int(number), JobRef(number, workdir)))
            continue
        for rng in structure:
            first, last = int(rng.findtext("RN_min", "1")), int(rng.findtext("RN_max", "1"))
            step = int(rng.findtext("RN_step", "1") or 1)
            refs += [(int(number), JobRef(f"{number}.{t}", workdir, t - 1)) for t in range(first, last + 1, step)]
    return [ref for _, ref in sorted(refs, key=lambda pair: pair[0], reverse=True)]
