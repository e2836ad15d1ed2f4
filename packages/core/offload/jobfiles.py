"""A job's directory on the site, and the name of every file offload keeps in it: one module owns them all.

The submission writes the batch script, the secrets and the submit command's answer; the batch script writes
the output, the exit code (and, for a job of several copies, one file per copy); a relay's client finds its
targets in ``reach.json``; the local scheduler marks a cancelled job; a raced attempt
finds its claim or release (``decision``). Everything else in the directory is the
user's (``JobSpec.files``, what the payload writes), so these names are refused there (:data:`RESERVED`). Files
of an array task carry its index as a suffix (``output.3``), as :class:`JobPaths` and the batch script spell it.
"""

from __future__ import annotations

from dataclasses import dataclass

SCRIPT = "job.sh"  # the batch script
SECRETS = "secrets.env"  # 0600, read and removed by the job as it starts (one per array task: secrets.env.<i>)
JOB_ID = "jobid"  # what the submit command printed
SUBMIT_ERRORS = "submit.err"  # what it said on stderr
OUTPUT = "output"  # the payload's stdout and stderr
EXIT_CODE = "exitcode"  # the payload's exit code, exactly, written last
CANCELLED = "cancelled"  # the local scheduler's mark of a job it cancelled
STARTED = "started"  # the local scheduler's record of its process's start time
COPIES = "copies"  # a directory: one file per copy of a job on several nodes
REACH = "reach.json"  # the relay's targets, without credentials, for any client that serves it
DECISION = "decision"  # a raced attempt's claim or release: a symbolic link (offload.claims)

# offload's own files in a job's directory: never staged over, never read as a user's file
RESERVED = frozenset(
    {SCRIPT, SECRETS, JOB_ID, SUBMIT_ERRORS, OUTPUT, EXIT_CODE, CANCELLED, STARTED, COPIES, REACH, DECISION}
)


@dataclass(frozen=True)
class JobPaths:
    """Where the files of one job (or one array task: ``index``) are on the site."""

    jobdir: str
    index: int | None = None

    def file(self, name: str) -> str:
        """A file of the job's directory (a user's, or one of offload's shared by every task, such as SCRIPT)."""
        return f"{self.jobdir}/{name}"

    def _own(self, name: str) -> str:
        return self.file(name if self.index is None else f"{name}.{self.index}")

    @property
    def script(self) -> str:
        return self.file(SCRIPT)

    @property
    def output(self) -> str:
        return self._own(OUTPUT)

    @property
    def exit_code(self) -> str:
        return self._own(EXIT_CODE)

    @property
    def secrets(self) -> str:
        return self._own(SECRETS)

    @property
    def job_id(self) -> str:
        return self.file(JOB_ID)

    @property
    def reach(self) -> str:
        return self.file(REACH)
