"""The local transport: the same interface as SSH, for the ``local`` site and for running on a login node."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from offload.errors import SiteNotAnswering, TransportError
from offload.transports.base import CommandResult, Progress


class _NoForward:
    """Local services are reached directly: the "forward" is the port itself."""

    def __init__(self, port: int) -> None:
        self._port = port

    @property
    def local_port(self) -> int:
        return self._port

    async def interactive(self, argv: Sequence[str]) -> int:
        process = await asyncio.create_subprocess_exec(*argv)  # inherits this terminal
        return await process.wait()

    async def close(self) -> None:
        return None


class _LocalProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.stdin = process.stdin
        self.stdout = process.stdout

    async def wait(self) -> int:
        return await self._process.wait()

    def close(self) -> None:
        if self._process.returncode is None:
            self._process.kill()


class LocalTransport:
    """Runs commands as subprocesses of this process (argv, no shell) and touches local files."""

    description = "local"

    def __init__(self, config: object | None = None) -> None:
        self.stats: Counter[str] = Counter()
        self._timeout = float(getattr(config, "command_timeout", 45.0))

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult:
        data = input.encode() if isinstance(input, str) else input
        self.stats[f"run:{argv[0]}"] += 1
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if data is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise TransportError(f"{argv[0]!r} is not installed on this machine") from None
        limit = timeout if timeout is not None else self._timeout
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(data), limit)
        except TimeoutError:
            process.kill()
            raise SiteNotAnswering(f"{argv[0]!r} did not finish within {limit:g} s (command_timeout)") from None
        result = CommandResult(
            tuple(argv),
            process.returncode if process.returncode is not None else 255,
            stdout.decode("utf-8", "replace"),
            stderr.decode("utf-8", "replace"),
        )
        return result.check() if check else result

    async def start(self, argv: Sequence[str]) -> _LocalProcess:
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
        except FileNotFoundError:
            raise TransportError(f"{argv[0]!r} is not installed on this machine") from None
        return _LocalProcess(process)

    async def home(self) -> str:
        return str(Path.home())

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(path, mode)

    async def read_file(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        try:
            with open(path, "rb") as f:
                if offset < 0:  # the last -offset bytes
                    f.seek(max(0, os.fstat(f.fileno()).st_size + offset))
                else:
                    f.seek(offset)
                return f.read(-1 if size is None else size)
        except FileNotFoundError:
            return b""

    async def put(self, local: str, remote: str, *, mode: int = 0o600, resume: bool = False,
                  progress: Progress | None = None) -> None:  # fmt: skip
        await asyncio.get_running_loop().run_in_executor(None, _copy, local, remote, mode, progress)

    async def get(self, remote: str, local: str, *, progress: Progress | None = None) -> None:
        await asyncio.get_running_loop().run_in_executor(None, _copy, remote, local, 0o600, progress)

    async def forward_local_port(self, remote_host: str, remote_port: int, local_port: int = 0) -> _NoForward:
        return _NoForward(remote_port)

    async def interactive(self, argv: Sequence[str]) -> int:
        process = await asyncio.create_subprocess_exec(*argv)  # inherits this terminal
        return await process.wait()

    async def close(self) -> None:
        return None


def _copy(source: str, target: str, mode: int, progress: Progress | None) -> None:
    total, done = os.path.getsize(source), 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
        while chunk := src.read(1 << 22):
            dst.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, total)
    if progress and not total:
        progress(0, 0)
