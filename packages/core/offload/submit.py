"""Sending a batch of jobs to a site in one round trip, all or nothing.

One shell program per channel makes each job's 0700 directory, writes its files with shell builtins (no fork,
no temporary file, values in no process list), submits it with the scheduler's own command and reports
``OFFLOAD_SUBMIT <n> <rc> <answer>``. Large batches are spread over a few channels of the one connection, so
slurmctld serves them in parallel where a local loop of ``sbatch`` waits for each in turn.

Every write is checked: a full disk or a quota fails the submission with the file's name and the shell's own
error, before the scheduler ever sees that job. Whatever fails (a refusal, a write, a lost channel), the jobs of
the batch that did get in are cancelled and their secrets removed, so nothing is left half-submitted. A program
whose channel was lost may still be submitting: it leaves an end mark when it stops, and the cleanup waits for
that mark (for a bounded time) before it asks the queue what got in, and says what it found and cancelled. The
program does its part too: once it finds its channel gone, it cancels the jobs it sent (the scheduler's
``abandon_line``), so a client killed mid-submission, or one that stopped waiting, leaves no job behind.

Secrets go to ``secrets.env`` (one copy per array task: ``secrets.env.<i>``), each ending with a completeness
mark the batch script checks before it runs the payload; the job removes its copy as soon as it has read it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field

from offload.errors import OffloadError, SubmissionError, TransportError
from offload.jobfiles import JOB_ID, SCRIPT, SECRETS, SUBMIT_ERRORS, JobPaths
from offload.jobs import JobRef
from offload.schedulers.base import Scheduler
from offload.script import secrets_file
from offload.spec import JobSpec
from offload.transports.base import CommandResult, Transport

log = logging.getLogger("offload.submit")

MARK = "OFFLOAD_SUBMIT"
PARALLEL_SUBMISSIONS = 4  # channels a large batch of distinct jobs is spread over
ENDED = ".submission-ended"  # end mark of a program, in its first job directory (a dot: no spec file has it)
UNDO_WAIT = 60  # seconds the cleanup of a lost channel waits for the program to end before it asks the queue
LISTED = 20  # job ids a cleanup message names; beyond that, how many more


@dataclass
class Submission:
    """One submit command: a spec, its job directory and batch script, and how many array tasks."""

    spec: JobSpec
    jobdir: str
    script: str
    array_size: int | None
    secrets: dict[str, str] = field(default_factory=dict)  # what secrets.env holds (spec's and offload's own)
    files: dict[str, bytes] = field(default_factory=dict)  # staged files, offload's own included
    paths: list[str] = field(default_factory=list)  # what must exist on the site first (a path image)
    ids: list[str] = field(default_factory=list)


def program(numbered: Sequence[tuple[int, Submission]], jobs_dir: str, scheduler: Scheduler) -> str:
    """The shell program that submits ``numbered`` and reports each job's outcome on stdout.

    Each job's answer is all its submit line printed (a site's wrapper may greet before the job id), framed by
    ``OFFLOAD_SUBMIT <n> <rc>`` and ``OFFLOAD_SUBMIT_END <n>``. Once its channel is gone, the program stops at its
    next report (a trapped SIGPIPE, after the submission in flight), and whatever ends it, it leaves its end
    mark (:func:`end_mark`): the cleanup of a lost channel knows from it that nothing more will be submitted.
    Stopped that way, by SIGHUP or by SIGTERM, it first cancels every job it sent (``offload_abandon``)."""
    abandon = scheduler.abandon_line()
    lines = [
        "umask 077",
        # the jobs it sent (their directories and array sizes), which it cancels if its channel goes
        "offload_dirs=(); offload_sizes=()",
        'offload_abandon() { local a n k; for k in "${!offload_dirs[@]}"; do a=${offload_dirs[$k]}; '
        f"n=${{offload_sizes[$k]}}\n{abandon.rstrip() or '    :'}\n    done; }} > /dev/null 2>&1",
        "trap 'offload_abandon; exit 129' HUP; trap 'offload_abandon; exit 141' PIPE; "
        "trap 'offload_abandon; exit 143' TERM",
        f"trap {shlex.quote(f': 2>/dev/null > {shlex.quote(end_mark(numbered))}')} EXIT",
        f'offload_fail() {{ printf "\\n{MARK}_FAIL %s\\n" "$1"; rm -f "$d"/{SECRETS}*; exit 93; }}',
        f'offload_missing() {{ printf "\\n{MARK}_MISSING %s\\n" "$1"; exit 94; }}',
        # a file's lines, with shell builtins only (no fork per job)
        """offload_answer() { while IFS= read -r l || [ -n "$l" ]; do printf '%s\\n' "$l"; done < "$1"; }""",
        "d=",
        f"mkdir -p {shlex.quote(jobs_dir)} || offload_fail {shlex.quote(jobs_dir)}",
        *scheduler.sweep_lines(jobs_dir),
    ]
    dirs = [shlex.quote(sub.jobdir) for _, sub in numbered]
    for start in range(0, len(dirs), 200):
        lines.append(f"mkdir -m 700 {' '.join(dirs[start : start + 200])} || offload_fail {dirs[start]}")
    for path in dict.fromkeys(p for _, sub in numbered for p in sub.paths):  # before anything is written
        lines.append(f"[ -e {shlex.quote(path)} ] || offload_missing {shlex.quote(path)}")
    for (number, sub), quoted in zip(numbered, dirs, strict=True):
        lines += [f"d={quoted}", f'printf %s {shlex.quote(sub.script)} > "$d/{SCRIPT}" || offload_fail "$d/{SCRIPT}"']
        if sub.secrets:
            # printf is a shell builtin: the values appear in no process list and no temp file.
            lines.append(f"s={shlex.quote(secrets_file(sub.secrets))}")
            if sub.array_size:
                lines.append(f'for i in {{0..{sub.array_size - 1}}}; do printf %s "$s" > "$d/{SECRETS}.$i" '
                             f'|| offload_fail "$d/{SECRETS}.$i"; done; s=')  # fmt: skip
            else:
                lines.append(f'printf %s "$s" > "$d/{SECRETS}" || offload_fail "$d/{SECRETS}"; s=')
        for file_name, data in sub.files.items():
            encoded = base64.b64encode(data).decode()
            if file_name.endswith("/"):  # a directory: one archive, however many files it holds
                folder = file_name.removesuffix("/")
                lines.append(f'mkdir -p "$d/{folder}" && printf %s {encoded} | base64 -d | tar -xzf - --no-same-owner '
                             f'-C "$d/{folder}" || offload_fail "$d/{folder}/"')  # fmt: skip
            else:
                lines.append(f'printf %s {encoded} | base64 -d > "$d/{file_name}" || offload_fail "$d/{file_name}"')
        submit = scheduler.submit_line(f'"$d/{SCRIPT}"')
        mark = f"{MARK} {number}"
        lines += [
            f'offload_dirs+=("$d"); offload_sizes+=({sub.array_size or 0})',
            f'{{ {submit}; }} > "$d/{JOB_ID}" 2> "$d/{SUBMIT_ERRORS}"',
            f'rc=$?; if [ "$rc" = 0 ]; then printf "{mark} 0\\n"; offload_answer "$d/{JOB_ID}"; '
            f'else rm -f "$d"/{SECRETS}*; printf "{mark} %s\\n" "$rc"; offload_answer "$d/{SUBMIT_ERRORS}"; '
            f'offload_answer "$d/{JOB_ID}"; fi; printf "\\n{MARK}_END {number}\\n"',
        ]
    return "\n".join(lines) + "\n"


def end_mark(numbered: Sequence[tuple[int, Submission]]) -> str:
    """The file the program of ``numbered`` leaves when it stops, however it stops (but a SIGKILL)."""
    return f"{numbered[0][1].jobdir}/{ENDED}"


def outcomes(results: Sequence[CommandResult]) -> tuple[dict[int, tuple[int, str]], list[str], list[str]]:
    """Each job's ``(rc, answer)`` from the programs' output, the writes that failed (with the error), and the
    paths that had to exist and did not."""
    outcome: dict[int, tuple[int, str]] = {}
    writes: list[str] = []
    missing: list[str] = []
    for result in results:
        current: int | None = None  # the job whose answer the lines are, until its end line
        for line in result.stdout.splitlines():
            if line.startswith(f"{MARK}_FAIL "):
                error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no error text"
                writes.append(f"could not write {line.split(' ', 1)[1]} ({error})")
            elif line.startswith(f"{MARK}_MISSING "):
                missing.append(line.split(" ", 1)[1])
            elif line.startswith(MARK + " "):
                number, rc, *rest = line.split(" ", 3)[1:]
                outcome[int(number)] = (int(rc), rest[0] if rest else "")
                current = int(number)
            elif line.startswith(f"{MARK}_END "):
                current = None
            elif current is not None:
                rc, text = outcome[current]
                outcome[current] = (rc, f"{text}\n{line}".strip())
    return outcome, writes, missing


async def send(
    transport: Transport, scheduler: Scheduler, site: str, submissions: list[Submission], jobs_dir: str, lanes: int
) -> None:
    """Submit every one of ``submissions`` (filling in their ids), or none: raise after undoing what got in."""
    numbered = list(enumerate(submissions))
    lanes = max(1, min(PARALLEL_SUBMISSIONS, lanes, len(submissions) // 25))
    results = await asyncio.gather(
        *(transport.run(["bash", "-s"], input=program(numbered[lane::lanes], jobs_dir, scheduler), check=False,
                        timeout=max(300.0, 2.0 * len(submissions)))
          for lane in range(lanes)),
        return_exceptions=True,
    )  # fmt: skip
    lost = [r for r in results if isinstance(r, BaseException)]
    lost_marks = [end_mark(numbered[lane::lanes]) for lane, r in enumerate(results) if isinstance(r, BaseException)]
    done = [r for r in results if isinstance(r, CommandResult)]
    outcome, writes, missing = outcomes(done)
    failures: list[str] = []
    unknown: list[Submission] = []  # may be queued, but no id came back: their channel was lost, or no id line
    for number, sub in enumerate(submissions):
        rc, text = outcome.get(number, (-1, ""))
        if rc == 0:
            try:
                sub.ids = scheduler.job_ids(text, sub.array_size)
            except ValueError as exc:
                failures.append(f"{sub.spec.name or 'job'}: {exc}")
                unknown.append(sub)
        elif rc > 0:
            failures.append(text.strip())
        elif lost:
            unknown.append(sub)
    if not lost and not writes and not missing and not failures and all(sub.ids for sub in submissions):
        return
    # All or nothing: cancel what got in, from the answers we have and, for the rest, from the queue itself.
    cleanup = await undo(transport, scheduler, submissions, jobs_dir, unknown, lost_marks)
    if lost:
        error = lost[0]
        if isinstance(error, OffloadError):
            error.args = (f"{error}\n{cleanup}", *error.args[1:])  # same error, and what became of the batch
            raise error
        raise TransportError(f"submitting to {site} failed: {error!r}\n{cleanup}") from error
    if missing:
        raise SubmissionError(
            f"site '{site}': the image {missing[0]} does not exist on the site (looked for on the login node, "
            "before queueing anything). Fix the path, or give a registry image (docker://...) if the site's "
            f"runtime pulls those.\n{cleanup}",
            scheduler_message=f"missing: {missing[0]}",
        )
    if writes:
        raise SubmissionError(
            f"site '{site}': {writes[0]}. The file system of the site's workdir is full or over its quota: free "
            f"space there (or set 'workdir' elsewhere) and submit again.\n{cleanup}",
            scheduler_message=writes[0],
        )
    message = (failures[0] if len(set(failures)) == 1 else "\n".join(sorted(set(failures)))) if failures else (
        "the submission stopped early: " + "\n".join(r.stderr.strip() for r in done if r.stderr.strip()))  # fmt: skip
    raise SubmissionError(
        f"site '{site}' refused the job: {message}\n{scheduler.explain(message)}{cleanup}",
        scheduler_message=message,
    )


async def undo(
    transport: Transport,
    scheduler: Scheduler,
    submissions: list[Submission],
    jobs_dir: str,
    unknown: Sequence[Submission] = (),
    running: Sequence[str] = (),
) -> str:
    """Cancel the jobs of a failed batch that got in, remove their secrets, and say exactly what was found and
    cancelled (the sentence ends the error the caller raises).

    The ids the site answered are cancelled as they are. ``unknown`` submissions may be in although no id came
    back: a program whose channel was lost may still be submitting (an ``sbatch`` in flight, the rest of its
    batch), and its jobid files may be empty or half written. So the cleanup first waits (at most
    :data:`UNDO_WAIT` s) for the end marks ``running`` of those programs, then reads their jobid files and asks
    the queue once for the jobs whose working directory is one of theirs (each submission's own), and cancels
    what it finds. It says nothing was left queued only when it knows."""
    known = [JobRef(i, s.jobdir) for s in submissions for i in s.ids]
    found: list[JobRef] = []
    still_running = asked_queue = False
    problems: list[str] = []
    if unknown:
        wait = (
            "wait=$1 count=$2; shift 2; waited=0\n"
            "while :; do\n"
            "    ended=1; i=0\n"
            '    for f; do i=$((i + 1)); [ "$i" -gt "$count" ] && break; [ -e "$f" ] || { ended=0; break; }; done\n'
            '    if [ "$ended" = 1 ] || [ "$waited" -ge "$wait" ]; then break; fi\n'
            "    sleep 1; waited=$((waited + 1))\n"
            "done\n"
            'echo "ended $ended"; shift "$count"\n'
            'for f; do cat "$f" 2>/dev/null; echo; done\n'
        )
        argv = ["sh", "-c", wait, "sh", str(UNDO_WAIT), str(len(running)), *running,
                *(JobPaths(s.jobdir).job_id for s in unknown)]  # fmt: skip
        try:
            result = await transport.run(argv, timeout=UNDO_WAIT + 120)
            first, _, answers = result.stdout.partition("\n")
            still_running = bool(running) and first.strip() != "ended 1"
            found += [JobRef(i, "") for i in scheduler.ids_in(answers)]
        except OffloadError as exc:
            problems.append(f"the jobid files could not be read ({exc})")
        try:  # a scheduler that can list jobs by directory says which got in (None: it cannot)
            listed = await scheduler.queued_in(transport, [s.jobdir for s in unknown])
            asked_queue = listed is not None
            found += listed or []
        except OffloadError as exc:
            asked_queue = True
            problems.append(f"the queue could not be asked what got in ({exc})")
    submitted = {_submitted(ref.id) for ref in known}
    extra = list({_submitted(ref.id): ref for ref in found if _submitted(ref.id) not in submitted}.values())
    cancelled = "cancelled"
    if known or extra:
        log.warning("the submission failed; cancelling the %d job(s) of the batch that got in", len(known) + len(extra))
        try:
            await scheduler.cancel(transport, [*known, *extra])
        except OffloadError as exc:
            cancelled = "NOT cancelled"
            problems.append(f"cancelling them failed ({exc})")
    with contextlib.suppress(OffloadError):
        dirs = [s.jobdir for s in submissions if s.secrets]
        if dirs:
            script = f'for d in "$@"; do rm -f "$d"/{SECRETS} "$d"/{SECRETS}.*; done'
            await transport.run(["sh", "-c", script, "sh", *dirs], timeout=120, check=False)
    for sub in submissions:
        sub.ids = []
    said: list[str] = []
    if known:
        said.append(f"The {len(known)} job(s) of this batch whose ids the site answered were {cancelled} "
                    f"({_ids(known)}).")  # fmt: skip
    if unknown:
        where = "in their jobid files" + (" or in the queue" if asked_queue else "")
        said.append(
            f"Of the {len(unknown)} submission(s) whose job id never came back, {len(extra)} job(s) were found "
            f"{where} and {cancelled} ({_ids(extra)})." if extra else
            f"Of the {len(unknown)} submission(s) whose job id never came back, no job was found {where}."
        )  # fmt: skip
    if still_running:
        said.append(
            f"The submission program left no end mark within {UNDO_WAIT} s: it may still be running (it cancels "
            "what it queues once it finds its channel gone), or have been killed. Look in the site's queue for "
            f"jobs whose working directory is under {jobs_dir} (on SLURM: squeue -u $USER -o '%i %Z') and cancel "
            "them."
        )
    if problems:
        said.append(
            f"Jobs of this batch may be left queued: {'; '.join(problems)}. Look in the site's queue for jobs whose "
            f"working directory is under {jobs_dir} and cancel them."
        )
    if not still_running and not problems:
        said.append("Nothing was queued." if not known and not extra else "Nothing was left queued.")
    return " ".join(said)


def _submitted(job_id: str) -> str:
    """``123_4;c2`` -> ``123;c2``: what names one submit command's job (its array tasks share it; the same
    number on another cluster is another job)."""
    bare, _, cluster = job_id.partition(";")
    return bare.split("_", 1)[0] + (f";{cluster}" if cluster else "")


def _ids(refs: Sequence[JobRef]) -> str:
    """Up to :data:`LISTED` ids, then how many more."""
    ids = [ref.id for ref in refs]
    more = f" and {len(ids) - LISTED} more" if len(ids) > LISTED else ""
    return ", ".join(ids[:LISTED]) + more
