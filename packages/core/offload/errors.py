"""offload's one error tree.

Every failure a user can meet is an :class:`OffloadError`; library errors (asyncssh, OS, TOML) are mapped to
these at the boundary where they happen, so callers never parse stderr text or catch a bare ``Exception``.
Each message says what went wrong and what to do next.
"""

from __future__ import annotations

import difflib


class OffloadError(Exception):
    """Base of every error offload raises on purpose."""


class ConfigError(OffloadError):
    """A site profile or a job spec is invalid. Raised before anything is submitted."""


class PluginError(OffloadError):
    """A scheduler, runtime or transport plugin is missing, duplicated or broken."""


class TransportError(OffloadError):
    """The site could not be reached, or the connection to it failed."""


class SiteNotAnswering(TransportError):
    """A command on the site did not finish within its timeout (a hung ``squeue``, a stuck file system)."""


class HostKeyError(TransportError):
    """The site's SSH host key is unknown or does not match known_hosts."""


class RemoteCommandError(TransportError):
    """A command on the site exited non-zero. Carries its argv, exit status and stderr."""

    def __init__(self, message: str, *, argv: list[str], exit_status: int | None, stderr: str) -> None:
        super().__init__(message)
        self.argv = argv
        self.exit_status = exit_status
        self.stderr = stderr


class SubmissionError(OffloadError):
    """The scheduler refused a job. ``scheduler_message`` is the scheduler's own words."""

    def __init__(self, message: str, *, scheduler_message: str = "") -> None:
        super().__init__(message)
        self.scheduler_message = scheduler_message


class ImageError(OffloadError):
    """An image could not be pulled, pushed or found in a site's cache. The message has the registry's or the
    runtime's own words, and what to do next."""


class JobFailedError(OffloadError):
    """A job ended in a state other than the one wanted (COMPLETED, or the state a caller awaited, e.g. RUNNING).
    Carries the job, the state it ended in, its exit code and the tail of its log."""

    def __init__(self, message: str, *, job_id: str, state: str, exit_code: int | None, log_tail: str = "") -> None:
        super().__init__(message)
        self.job_id = job_id
        self.state = state
        self.exit_code = exit_code
        self.log_tail = log_tail


class JobNotFoundError(OffloadError):
    """No job with this id is known to the site or to the local job records."""


def did_you_mean(word: str, candidates: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the candidate nearest a mistyped ``word``, else nothing: the one way offload's
    messages suggest a fix for a typo (a key, a site, a plugin's name)."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
