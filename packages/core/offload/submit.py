"""Sending a batch of jobs to a site in one round trip, all or nothing.

One shell program per channel makes each job's 0700 directory, writes its files with shell builtins (no fork,
no temporary file, values in no process list), submits it with the scheduler's own command and reports
``OFFLOAD_SUBMIT <n> <rc> <answer>``. Large batches are spread over a few channels of the one connection, so
slurmctld serves them in parallel where a local loop of ``sbatch`` waits for each in turn.

Every write is checked: a full disk or a quota fails the submission with the file's name and the shell's own
error, before the scheduler ever sees that job. Whatever fails (a refusal, a write, a lost channel), the jobs of
the batch that did get in are cancelled and their secrets removed, so nothing is left half-submitted.

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
from offload.jobs import JobRef
from offload.schedulers.base import Scheduler
from offload.script import secrets_file
from offload.spec import JobSpec
from offload.transports.base import CommandResult, Transport

log = logging.getLogger("offload.submit")

MARK = "OFFLOAD_SUBMIT"
PARALLEL_SUBMISSIONS = 4  # channels a large batch of distinct jobs is spread over


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
    """The shell program that submits ``numbered`` and reports each job's outcome on stdout."""
    lines = [
        "umask 077",
        f'offload_fail() {{ printf "\\n{MARK}_FAIL %s\\n" "$1"; rm -f "$d"/secrets.env*; exit 93; }}',
        f'offload_missing() {{ printf "\\n{MARK}_MISSING %s\\n" "$1"; exit 94; }}',
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
        lines += [f"d={quoted}", f'printf %s {shlex.quote(sub.script)} > "$d/job.sh" || offload_fail "$d/job.sh"']
        if sub.secrets:
            # printf is a shell builtin: the values appear in no process list and no temp file.
            lines.append(f"s={shlex.quote(secrets_file(sub.secrets))}")
            if sub.array_size:
                lines.append(f'for i in {{0..{sub.array_size - 1}}}; do printf %s "$s" > "$d/secrets.env.$i" '
                             '|| offload_fail "$d/secrets.env.$i"; done; s=')  # fmt: skip
            else:
                lines.append('printf %s "$s" > "$d/secrets.env" || offload_fail "$d/secrets.env"; s=')
        for file_name, data in sub.files.items():
            encoded = base64.b64encode(data).decode()
            if file_name.endswith("/"):  # a directory: one archive, however many files it holds
                folder = file_name.removesuffix("/")
                lines.append(f'mkdir -p "$d/{folder}" && printf %s {encoded} | base64 -d | tar -xzf - --no-same-owner '
                             f'-C "$d/{folder}" || offload_fail "$d/{folder}/"')  # fmt: skip
            else:
                lines.append(f'printf %s {encoded} | base64 -d > "$d/{file_name}" || offload_fail "$d/{file_name}"')
        submit = scheduler.submit_line('"$d/job.sh"')
        mark = f"{MARK} {number}"
        lines += [
            f'{{ {submit}; }} > "$d/jobid" 2> "$d/submit.err"',
            f'rc=$?; if [ "$rc" = 0 ]; then IFS= read -r out < "$d/jobid"; printf "{mark} 0 %s\\n" "$out"; '
            f'else rm -f "$d"/secrets.env*; printf "{mark} %s\\n" "$rc"; cat "$d/submit.err" "$d/jobid"; '
            f'printf "\\n{MARK}_END {number}\\n"; fi',
        ]
    return "\n".join(lines) + "\n"


def outcomes(results: Sequence[CommandResult]) -> tuple[dict[int, tuple[int, str]], list[str], list[str]]:
    """Each job's ``(rc, answer)`` from the programs' output, the writes that failed (with the error), and the
    paths that had to exist and did not."""
    outcome: dict[int, tuple[int, str]] = {}
    writes: list[str] = []
    missing: list[str] = []
    for result in results:
        failing: int | None = None
        for line in result.stdout.splitlines():
            if line.startswith(f"{MARK}_FAIL "):
                error = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "no error text"
                writes.append(f"could not write {line.split(' ', 1)[1]} ({error})")
            elif line.startswith(f"{MARK}_MISSING "):
                missing.append(line.split(" ", 1)[1])
            elif line.startswith(MARK + " "):
                number, rc, *rest = line.split(" ", 3)[1:]
                outcome[int(number)] = (int(rc), rest[0] if rest else "")
                failing = int(number) if rc != "0" else None
            elif line.startswith(f"{MARK}_END "):
                failing = None
            elif failing is not None:
                rc, text = outcome[failing]
                outcome[failing] = (rc, f"{text}\n{line}".strip())
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
    done = [r for r in results if isinstance(r, CommandResult)]
    outcome, writes, missing = outcomes(done)
    failures: list[str] = []
    for number, sub in enumerate(submissions):
        rc, text = outcome.get(number, (-1, ""))
        if rc == 0:
            try:
                sub.ids = scheduler.job_ids(text, sub.array_size)
            except ValueError as exc:
                failures.append(f"{sub.spec.name or 'job'}: {exc}")
        elif rc > 0:
            failures.append(text.strip())
    if not lost and not writes and not missing and not failures and all(sub.ids for sub in submissions):
        return
    # All or nothing: cancel what got in, from the answers we have and from the jobid files on the site.
    await undo(transport, scheduler, submissions, lost_channels=bool(lost))
    if lost:
        error = lost[0]
        if isinstance(error, OffloadError):
            raise error
        raise TransportError(f"submitting to {site} failed: {error!r}") from error
    if missing:
        raise SubmissionError(
            f"site '{site}': the image {missing[0]} does not exist on the site (looked for on the login node, "
            "before queueing anything). Fix the path, or give a registry image (docker://...) if the site's "
            "runtime pulls those; nothing was submitted.",
            scheduler_message=f"missing: {missing[0]}",
        )
    if writes:
        raise SubmissionError(
            f"site '{site}': {writes[0]}. The file system of the site's workdir is full or over its quota: free "
            "space there (or set 'workdir' elsewhere) and submit again; nothing was left queued.",
            scheduler_message=writes[0],
        )
    message = (failures[0] if len(set(failures)) == 1 else "\n".join(sorted(set(failures)))) if failures else (
        "the submission stopped early: " + "\n".join(r.stderr.strip() for r in done if r.stderr.strip()))  # fmt: skip
    raise SubmissionError(
        f"site '{site}' refused the job: {message}\n{scheduler.explain(message)}Nothing was left queued.",
        scheduler_message=message,
    )


async def undo(transport: Transport, scheduler: Scheduler, submissions: list[Submission], lost_channels: bool) -> None:
    """Cancel the jobs of a failed batch that got in, and remove their secrets: nothing is left behind."""
    refs = [JobRef(i, s.jobdir) for s in submissions for i in s.ids]
    with contextlib.suppress(OffloadError):
        if lost_channels:  # a channel died mid-way: its jobs' ids are only in their jobid files
            paths = [f"{s.jobdir}/jobid" for s in submissions if not s.ids]
            result = await transport.run(["sh", "-c", 'cat "$@" 2>/dev/null; true', "sh", *paths], timeout=120)
            refs += [JobRef(i, "") for i in scheduler.ids_in(result.stdout)]
        if refs:
            log.warning("the submission failed; cancelling the %d job(s) of the batch that got in", len(refs))
            await scheduler.cancel(transport, refs)
        dirs = [s.jobdir for s in submissions if s.secrets]
        if dirs:
            script = 'for d in "$@"; do rm -f "$d"/secrets.env "$d"/secrets.env.*; done'
            await transport.run(["sh", "-c", script, "sh", *dirs], timeout=120, check=False)
    for sub in submissions:
        sub.ids = []
