"""The scheduler interface: a scheduler plugin owns its whole protocol (directives, the submit command and its
answer, state queries, cancel, steps, limits); :mod:`offload.submit` and :class:`offload.Site` only drive it."""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from offload import jobfiles
from offload.errors import ConfigError
from offload.jobs import JobRef, JobState, JobStatus
from offload.spec import JobSpec, Resources
from offload.transports.base import Transport

if TYPE_CHECKING:
    from offload.config import SiteConfig


@dataclass(frozen=True)
class NodeResources:
    """One node as the scheduler sees it now: what it has, what is in use, and where it can be asked for."""

    name: str
    partitions: tuple[str, ...]
    state: str  # the scheduler's own word: idle, mix, alloc, down, drain, ...
    gpus: int
    gpus_used: int
    cpus: int
    cpus_used: int
    memory_mb: int
    memory_used_mb: int
    # Whether the node takes new jobs, as its scheduler plugin reads its own state words; None: ``state`` is one
    # of SLURM's (the default below reads those).
    takes_jobs: bool | None = None

    @property
    def available(self) -> bool:
        """The node takes new jobs (not down, drained or failing)."""
        if self.takes_jobs is not None:
            return self.takes_jobs
        return self.state.rstrip("*~#!%$@^-") in ("idle", "mix", "mixed", "alloc", "allocated", "completing")

    @property
    def gpus_free(self) -> int:
        return max(0, self.gpus - self.gpus_used) if self.available else 0

    @property
    def cpus_free(self) -> int:
        return max(0, self.cpus - self.cpus_used) if self.available else 0


@dataclass(frozen=True)
class StartEstimate:
    """When a scheduler expects a job to start if it were submitted now, by its own planning (SLURM's
    ``sbatch --test-only``): what the ``estimate`` placement policy ranks sites by."""

    seconds: float | None  # from now; None: the scheduler would not say
    refused: str = ""  # the scheduler's words if it would refuse the job as asked (then ``seconds`` is None)
    where: str = ""  # the scheduler's words on where it would run it, for people ("on n1 in partition gpu")


# Runs a shell script as a job's script would run on the login node (the profile's shell after its setup lines):
# its exit status and output. What offload doctor hands a scheduler's own checks.
Shell = Callable[[str], Awaitable[tuple[int, str]]]


class Scheduler:
    """The base of every scheduler plugin. A plugin owns its whole protocol: it must give the methods that raise
    here (directives, submission, state queries, cancel, steps), and it may override the defaults of the rest
    (the defaults are what a scheduler that offers nothing more does). The core reads everything through these
    names, never through a plugin's own; what a scheduler calls things (states, reasons, commands) stays in it.
    """

    name: str = ""
    supports_arrays: bool = False
    # A job's Resources.cpus are reserved for it (False: the scheduler cannot reserve CPUs, and refuses cpus > 1)
    reserves_cpus: bool = True
    task_index: str = ""  # shell expression for the array task index inside the batch script
    # For multi-node jobs: variable -> shell expression each copy evaluates (RANK...)
    copy_env: ClassVar[dict[str, str]] = {}
    job_env: tuple[str, ...] = ()  # what the scheduler tells a job that its payload may need inside the container
    first_node: str = ""  # shell expression naming the job's first node (MASTER_ADDR), in the batch script
    commands: tuple[str, ...] = ()  # the programs offload doctor looks for on the login node
    # Profile keys of its own: name -> a type, or a tuple of the strings it may be (checked by offload.profiles)
    profile_keys: ClassVar[dict[str, type | tuple[str, ...]]] = {}
    runs_on_client: bool = False  # its jobs are processes of the client's machine (no relay, no step)

    def __init__(self, config: SiteConfig) -> None:
        self.config = config

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"the scheduler plugin {self.name or type(self).__name__!r} does not give {what}")

    def directives(
        self, spec: JobSpec, jobdir: str, array_size: int | None, parallelism: int | None = None
    ) -> list[str]:
        """Header lines of the batch script (e.g. ``#SBATCH --gpus=2``); ``parallelism`` caps the array tasks
        running at once. Raise ConfigError for bad values."""
        raise self._missing("directives()")

    def launcher(self, res: Resources) -> list[str]:
        """The argv prefix that starts one copy of the payload per task of the job's allocation (``srun``)."""
        raise self._missing("launcher()")

    def submit_line(self, script_path: str) -> str:
        """A shell line that submits ``script_path`` and prints the job id (the path is already quoted)."""
        raise self._missing("submit_line()")

    def job_ids(self, output: str, array_size: int | None) -> list[str]:
        """The ids of the submitted job (one per array task) from the submit line's output."""
        raise self._missing("job_ids()")

    def ids_in(self, text: str) -> list[str]:
        """Every job id in ``text`` made of submit-line answers (jobid files read back after a lost channel)."""
        raise self._missing("ids_in()")

    def abandon_line(self) -> str:
        """A shell line for the submission program that cancels the job it submitted from the directory ``$a``
        (the submit command's answer is in ``$a/jobid``; ``$n`` is the array size, 0 for a single job). The
        program runs it for each job it sent once it finds its channel gone (SIGPIPE at its next report, SIGHUP,
        SIGTERM): a client killed or cut off mid-submission then leaves no job, whether or not it lives to
        cancel them itself. Default: '' (no such line: only the client's cleanup cancels them)."""
        return ""

    def sweep_lines(self, jobs_dir: str) -> list[str]:
        """Shell lines for the submission program that remove, in the background, the secrets files of jobs
        that ended without ever starting (so without removing them themselves). Default: none."""
        return []

    def explain(self, message: str) -> str:
        """What the user can do about a refusal whose words are ``message`` ('' if nothing to add)."""
        return ""

    async def limits(self, transport: Transport) -> dict[str, int]:
        """Limits submission plans with; ``max_array_size`` is the most tasks one array may have. Default: none."""
        return {}

    async def poll(self, transport: Transport, refs: Sequence[JobRef]) -> dict[str, JobStatus]:
        """Statuses of ``refs`` in as few scheduler calls as possible (ideally one); UNKNOWN, never a guess."""
        raise self._missing("poll()")

    async def cancel(self, transport: Transport, refs: Sequence[JobRef]) -> None:
        """Cancel all ``refs`` in one call."""
        raise self._missing("cancel()")

    async def interactive(self, transport: Transport, ref: JobRef, argv: list[str], pty: bool = True) -> list[str]:
        """The argv that runs ``argv`` inside the running job ``ref``, on a terminal if ``pty``."""
        raise ConfigError(f"scheduler {self.name!r} has no way to run a command inside a running job")

    async def nodes(self, transport: Transport) -> list[NodeResources]:
        """Every node with its GPUs, CPUs and memory, total and in use, in one scheduler call."""
        raise self._missing("nodes()")

    async def step(self, transport: Transport, ref: JobRef, node: str, argv: list[str]) -> list[str] | None:
        """The argv that runs ``argv`` as a step of the running job ``ref`` on ``node``, its stdin and stdout
        streamed (a reach relay's carrier). None: the job runs on the client's machine (reach goes direct)."""
        return None

    def first_host(self, nodelist: str) -> str:
        """The first host of the scheduler's node list of a job (where its batch script runs)."""
        return nodelist.split(",")[0]

    async def find(self, transport: Transport, name: str) -> list[JobRef] | None:
        """Jobs of this user with this name still known to the scheduler, newest first; None where the scheduler
        cannot say (offload then looks in this machine's job records)."""
        return None

    async def queued_in(self, transport: Transport, jobdirs: Sequence[str]) -> list[JobRef] | None:
        """The queued jobs whose directory is one of ``jobdirs`` (what got in of an interrupted submission); None
        where the scheduler cannot list jobs by directory."""
        return None

    async def estimate_start(self, transport: Transport, spec: JobSpec) -> StartEstimate | None:
        """When ``spec`` would start if submitted now, by the scheduler's own planning, in one call that submits
        nothing. None where the scheduler has no such planning (the ``estimate`` policy then goes by free
        resources alone). Default: None."""
        return None

    async def doctor_checks(self, transport: Transport, shell: Shell) -> list[tuple[str, str, str, str]]:
        """The scheduler's own checks for offload doctor, each ``(name, "ok"|"fail"|"skip", detail, fix)``;
        ``shell`` runs a script as a job's script would on the login node. Default: none."""
        return []


LOST_AFTER = 600  # seconds a job may be gone from the queue without an exit code on a site with no accounting


async def exit_code_files(
    transport: Transport, refs: Sequence[JobRef], accounting: bool | None = None
) -> dict[str, JobStatus]:
    """Statuses from the exit code files the batch script writes, in one command for all ``refs``.

    A job with no file yet is UNKNOWN, not FAILED: shared file systems show the file late, and accounting may
    answer at the next poll. Only on a site that keeps no accounting at all (``accounting is False``), a job
    whose file is still missing well after it left the queue is reported FAILED, saying so."""
    script = (
        'for f in "$@"; do printf "%s|" "$f"; if [ -f "$f" ]; then head -n1 "$f"; echo; '
        f'else printf "|"; stat -c %Y "${{f%/*}}/{jobfiles.SCRIPT}" 2>/dev/null || echo; fi; done; '
        'printf "now|%s\\n" "$(date +%s)"'
    )
    result = await transport.run(["sh", "-c", script, "sh", *(ref.exitcode_path for ref in refs)], check=False)
    by_path: dict[str, str] = {}
    ages: dict[str, int] = {}
    now = 0
    for line in result.stdout.splitlines():
        if line.startswith("now|"):
            now = int(line[4:]) if line[4:].strip().isdigit() else 0
            continue
        path, _, rest = line.partition("|")
        if not path:
            continue
        if rest.startswith("|"):  # no file: the job script's age instead
            stamp = rest[1:].strip()
            if stamp.isdigit():
                ages[path] = int(stamp)
        else:
            by_path[path] = rest.strip()
    statuses: dict[str, JobStatus] = {}
    for ref in refs:
        code = by_path.get(ref.exitcode_path, "")
        if code.isdigit():
            state = JobState.COMPLETED if code == "0" else JobState.FAILED
            statuses[ref.id] = JobStatus(state, "" if code == "0" else "NonZeroExitCode", int(code))
        elif accounting is False and now and ref.exitcode_path in ages and now - ages[ref.exitcode_path] > LOST_AFTER:
            statuses[ref.id] = JobStatus(
                JobState.FAILED,
                f"left the queue without writing its exit code, and the site keeps no accounting to say why "
                f"(killed, timed out or lost with its node; looked for {LOST_AFTER} s)",
            )
        else:
            statuses[ref.id] = JobStatus(
                JobState.UNKNOWN, "not in the queue; no accounting record or exit code file (yet)"
            )
    return statuses


def read_answer(jobdir_var: str, parse: str) -> str:
    """Shell lines that set ``id`` (and ``cluster``, if ``parse`` finds one) from the job directory
    ``$<jobdir_var>``'s ``jobid`` file, all its submit command printed: ``parse`` reads one ``$line`` and sets
    them when the line is an answer, so the last answer wins over a site wrapper's banner."""
    return (
        "    id=; cluster=\n"
        f'    [ -f "${jobdir_var}/{jobfiles.JOB_ID}" ] && while IFS= read -r line || [ -n "$line" ]; do\n'
        f"{parse}"
        f'    done < "${jobdir_var}/{jobfiles.JOB_ID}"\n'
    )


def secrets_sweep(jobs_dir: str, live: str, parse: str, queue: str = "    queue=$live\n") -> list[str]:
    """The submission program's background sweep, for a scheduler's ``sweep_lines``: the secrets files of jobs
    that left the queue without starting (cancelled while pending, nobody watching) are removed. Only files
    older than 2 minutes, and only if the queue answered, so a job being submitted is never touched.

    ``live`` prints the ids of the user's queued jobs; ``parse`` is shell lines that set ``id`` from one
    ``$line`` of a job's ``jobid`` file (all the submit command printed, a site wrapper's banner too: the last
    line that is an answer wins); ``queue`` sets ``$queue``, the ids ``$id`` is looked for in."""
    sweep = (
        f"cd {shlex.quote(jobs_dir)} || exit 0\n"
        f"live=$({live}) || exit 0\n"
        f"find . -mindepth 2 -maxdepth 2 -name '{jobfiles.SECRETS}*' -mmin +2 | while read -r f; do\n"
        "    d=${f%/*}\n"
        f"{read_answer('d', parse)}"
        '    [ -n "$id" ] || continue\n'
        f"{queue}"
        """    printf '%s\\n' "$queue" | grep -qx "$id" || rm -f "$f"\n"""
        "done\n"
    )
    return [f"(setsid sh -c {shlex.quote(sweep)} </dev/null >/dev/null 2>&1 &)"]
