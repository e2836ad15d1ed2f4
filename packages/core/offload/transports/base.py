"""The transport interface every site connection implements (ssh, local, or a plugin's)."""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from offload.errors import RemoteCommandError


@dataclass(frozen=True)
class CommandResult:
    """A finished command on the site."""

    argv: tuple[str, ...]
    exit_status: int
    stdout: str
    stderr: str

    def check(self) -> CommandResult:
        """Raise :class:`RemoteCommandError` with the command's stderr if it failed."""
        if self.exit_status != 0:
            shown = shlex.join(self.argv)
            if len(shown) > 200:
                shown = shown[:200] + "..."
            detail = (self.stderr or self.stdout).strip() or "(no output)"
            raise RemoteCommandError(
                f"command on the site failed with exit status {self.exit_status}: {shown}\n{detail}",
                argv=list(self.argv),
                exit_status=self.exit_status,
                stderr=self.stderr,
            )
        return self


Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class PortForward(Protocol):
    """A local 127.0.0.1 port that reaches a host:port on the site."""

    @property
    def local_port(self) -> int: ...

    async def close(self) -> None: ...


class Process(Protocol):
    """A command on the site that keeps running while bytes stream both ways (e.g. a relay's carrier).

    ``stdin`` has ``write(bytes)`` and ``async drain()``; ``stdout`` has ``async read(n)`` and
    ``async readexactly(n)`` (asyncio's stream interface, which asyncssh's streams share)."""

    stdin: Any
    stdout: Any

    async def wait(self) -> int: ...

    def close(self) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """Runs commands and moves files on one site. Implementations are async and safe to share.

    ``run`` takes an argv list, never a shell string: the transport quotes it for whatever shell sits on the
    far side, so no user value is ever pasted into a command line unquoted.
    """

    description: str

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult: ...

    async def start(self, argv: Sequence[str]) -> Process:
        """Start ``argv`` with binary stdin/stdout streams (stderr is logged), without waiting for it."""
        ...

    async def home(self) -> str:
        """The remote user's home directory (absolute), to resolve ``~`` in profile paths."""
        ...

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        """Create or replace ``path`` with ``data``, created with ``mode`` (never briefly wider)."""
        ...

    async def read_file(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """The bytes of ``path`` from ``offset`` on (negative: the last ``-offset`` bytes), at most ``size`` of
        them; empty if the file does not exist yet."""
        ...

    async def put(
        self, local: str, remote: str, *, mode: int = 0o600, resume: bool = False, progress: Progress | None = None
    ) -> None:
        """Copy the local file ``local`` to ``remote`` (created with ``mode``). ``resume``: a ``remote`` that is
        a partial earlier copy of this same file is continued, not sent again. ``progress(done, total)`` is
        called as bytes go."""  # fmt: skip
        ...

    async def get(self, remote: str, local: str, *, progress: Progress | None = None) -> None:
        """Copy the site's file ``remote`` to the local file ``local``."""
        ...

    async def forward_local_port(self, remote_host: str, remote_port: int, local_port: int = 0) -> PortForward:
        """Listen on 127.0.0.1:``local_port`` (0: any free port) and forward to the site's host:port."""
        ...

    async def interactive(self, argv: Sequence[str]) -> int:
        """Run ``argv`` attached to this process's terminal (a PTY on the far side); return its exit code."""
        ...

    async def close(self) -> None: ...
