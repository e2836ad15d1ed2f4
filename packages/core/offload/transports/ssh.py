"""The SSH transport: one asyncssh connection per site, shared by every command, SFTP and port forward.

It opens lazily, keeps itself alive, and when a connection that was up drops it reconnects with backoff; its
port forwards keep listening meanwhile (:mod:`offload.transports.ssh_forward`), so a laptop that sleeps or
changes networks carries on (the jobs keep running on the site meanwhile). A command is retried on a fresh
connection only when it provably never started (its channel failed to open); a submission is never sent twice.

sshd limits the session channels of a connection (``MaxSessions``): commands, the SFTP session and relay
carriers share a budget of ``max_sessions`` and wait for a free slot beyond it; a channel the server refuses
anyway waits too, and never takes the connection down with it. File operations are bounded by
``command_timeout`` like commands, and a dead or stuck SFTP session is replaced.

asyncssh and OS errors are mapped here, at the boundary, to offload's :mod:`offload.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import asyncssh

from offload.config import SiteConfig
from offload.errors import ConfigError, HostKeyError, SiteNotAnswering, TransportError
from offload.retry import RetryPolicy
from offload.transports.base import CommandResult, Progress
from offload.transports.ssh_coalesce import direct_connector, skip_empty_ignores
from offload.transports.ssh_forward import SSHForward

log = logging.getLogger("offload.ssh")
if logging.getLogger("asyncssh").level == logging.NOTSET:
    # asyncssh says five INFO lines per command; unless the user chose otherwise, only its warnings show.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)

# A connection that was up and dropped is tried again 7 times, pausing from 0.5 s up to 30 s (about a minute in
# all); jittered, so the clients of a login node that rebooted do not all come back in the same second.
_RECONNECT = RetryPolicy(first=0.5, factor=2.0, cap=30.0, attempts=8)
# A file goes in chunks of this size, two at a time; asyncssh splits each into parallel SFTP writes of the
# largest size the server allows (OpenSSH: 256 KiB), so the pipe stays full without a chunk per request.
_CHUNK = 8 << 20
_CHUNKS_IN_FLIGHT = 2
# AES-GCM first: one OpenSSL call per packet (CPUs have AES instructions), where asyncssh's ChaCha20-Poly1305
# takes several; forwards move ~1.3x more per second with it (bench/transfer.py). The rest of asyncssh's
# defaults follow, for servers that allow neither.
_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes256-ctr",
            "aes192-ctr", "aes128-ctr"]  # fmt: skip


# The answers sshd gives to a session channel it will not open now: OpenSSH says "open failed",
# administratively prohibited, beyond its MaxSessions. Other codes (an unknown channel type, a command or
# subsystem the server would not start) are not about how many sessions are open.
_REFUSALS = (asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, asyncssh.OPEN_CONNECT_FAILED, asyncssh.OPEN_RESOURCE_SHORTAGE)
# An SFTP session that ended under an operation (its channel closed while SSH stayed up, or with it).
_SFTP_GONE = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection, asyncssh.DisconnectError, ConnectionError)

_T = TypeVar("_T")


def _reconnectable(exc: Exception) -> bool:
    """A failed connect worth trying again: not an unknown host key (trusting one is the user's act)."""
    return isinstance(exc, TransportError) and not isinstance(exc, HostKeyError)


class _Channel(Protocol):
    """What a session channel's owner offers (asyncssh's processes and SFTP clients alike)."""

    async def wait_closed(self) -> None: ...


_C = TypeVar("_C", bound=_Channel)


async def _finishes(task: asyncio.Future[object], limit: float, moved: Callable[[], int] | None) -> bool:
    """Whether ``task`` ends before ``limit`` seconds pass, or with ``moved`` (bytes moved so far), before
    ``limit`` seconds pass without a byte moving: a long transfer is fine while it moves."""
    seen = moved() if moved else 0
    while True:
        done, _ = await asyncio.wait({task}, timeout=limit)
        if done:
            return True
        if moved is None or moved() == seen:
            return False
        seen = moved()


class _SessionBudget:
    """The session channels offload holds at once on one connection, kept within what its sshd allows.

    sshd counts every session channel (a command, the SFTP session, a relay's carrier, a shell) against its
    ``MaxSessions`` (10 unless the admins changed it) and refuses the one beyond; port forwards (direct-tcpip
    channels) are not counted, so they are not budgeted here. A channel beyond the budget waits for a free
    slot instead of being refused, and holds its slot for as long as it is open. If the server refuses one
    anyway (its limit is below ours), the budget drops to what is open now, for the rest of the connection.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self._freed = asyncio.Event()

    async def acquire(self) -> None:
        while self.open >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.open += 1

    def release(self) -> None:
        self.open -= 1
        self._freed.set()

    def refused(self) -> bool:
        """The server refused a channel whose slot was just released: lower the limit to what is open. Whether
        waiting for a slot can help (not when nothing else is open)."""
        if self.open == 0:
            return False
        if self.open < self.limit:
            log.warning(
                "the site refused an SSH session with %d open: offload opens no more than that at once on this "
                "connection from now on (the server's MaxSessions is below max_sessions)",
                self.open,
            )
            self.limit = self.open
        return True


def known_hosts_path(config: SiteConfig) -> Path:
    """The known_hosts file the site is checked against (the profile's, else ~/.ssh/known_hosts)."""
    return Path(config.known_hosts or "~/.ssh/known_hosts").expanduser()


def connect_options(config: SiteConfig, *, verify_host_key: bool = True) -> dict[str, object]:
    """Keyword arguments of :func:`asyncssh.connect` for a profile.

    Unset profile keys stay unset, so asyncssh fills them from the user's ``~/.ssh/config`` (HostName, User,
    Port, IdentityFile, ProxyJump): a user who can ``ssh leonardo`` needs only ``host = "leonardo"``.
    """
    options: dict[str, object] = {
        "keepalive_interval": config.keepalive,
        "keepalive_count_max": 3,
        "connect_timeout": config.connect_timeout,
        "encryption_algs": _CIPHERS,
    }
    if config.port is not None:
        options["port"] = config.port
    if config.user is not None:
        options["username"] = config.user
    keys: list[object] = [str(Path(p).expanduser()) for p in config.identity_files]
    if config.private_key:
        try:
            keys.insert(0, asyncssh.import_private_key(config.private_key))
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ConfigError(f"site '{config.name}': the private key given is not one ({exc})") from None
    if keys:
        options["client_keys"] = keys
    if not config.agent:
        options["agent_path"] = None
    if config.jump_host:
        options["tunnel"] = config.jump_host
    if config.ssh_config:
        options["config"] = [str(Path(p).expanduser()) for p in config.ssh_config]
    if verify_host_key and config.host_keys:
        options["known_hosts"] = asyncssh.import_known_hosts(config.host_keys)
    elif verify_host_key:
        path = known_hosts_path(config)
        # A missing file trusts nobody. (An empty value would not do: asyncssh reads an empty one as "use
        # ~/.ssh/known_hosts", so an empty known-hosts *object* stands for "nobody".) Nothing is auto-accepted.
        options["known_hosts"] = str(path) if path.exists() else asyncssh.import_known_hosts("")
    else:
        options["known_hosts"] = None
    return options


async def resolved_target(config: SiteConfig) -> tuple[str, int, str | None]:
    """Where the profile really connects, as asyncssh resolves it with the user's ``~/.ssh/config``: the host
    name, the port, and the ``HostKeyAlias`` (if any) the host key is looked up under."""
    options = {k: v for k, v in connect_options(config, verify_host_key=False).items() if k != "known_hosts"}
    resolved = await asyncssh.SSHClientConnectionOptions.construct(None, host=config.host or "", **options)
    return resolved.host, resolved.port, resolved.host_key_alias


def _redirect(stream: object, mode: str) -> object:
    """What asyncssh should connect one of our standard streams to. Terminals, pipes and sockets are handed over
    as they are; a regular file is read or written as a file (an event loop cannot watch one), and /dev/null or
    a closed stream is nothing at all (cron, nohup, ``</dev/null``)."""
    import os
    import stat

    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        kind = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return asyncssh.DEVNULL
    if stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind) or os.isatty(fd):
        return os.dup(fd)
    if stat.S_ISREG(kind):
        return os.fdopen(os.dup(fd), mode)
    return asyncssh.DEVNULL


class _SSHProcess:
    """A streaming command on one channel of the connection; stderr goes to the debug log."""

    def __init__(self, process: asyncssh.SSHClientProcess) -> None:
        self._process = process
        self.stdin = process.stdin
        self.stdout = process.stdout
        self._stderr = asyncio.ensure_future(self._log_stderr())

    async def _log_stderr(self) -> None:
        with contextlib.suppress(Exception):
            async for line in self._process.stderr:
                log.debug("remote stderr: %s", line.decode("utf-8", "replace").rstrip())

    async def wait(self) -> int:
        await self._process.wait_closed()
        return self._process.exit_status if self._process.exit_status is not None else 255

    def close(self) -> None:
        self._process.close()
        self._stderr.cancel()


class SSHTransport:
    """Commands, files and port forwards on a site over one asyncssh connection."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        who = f"{config.user}@" if config.user else ""
        port = f":{config.port}" if config.port else ""
        self.description = f"ssh://{who}{config.host}{port}"
        self.stats: Counter[str] = Counter()
        self._conn: asyncssh.SSHClientConnection | None = None
        self._lock: asyncio.Lock | None = None
        self._sftp_lock: asyncio.Lock | None = None
        self._budget = _SessionBudget(config.max_sessions)
        self._sftp: asyncssh.SFTPClient | None = None
        # Tasks that outlive the call that made them: each open session channel's, which gives its budget slot
        # back when the channel closes, and file operations left to a session that stopped answering.
        self._background: set[asyncio.Task[object]] = set()
        self._home: str | None = None
        self._forwards: set[SSHForward] = set()
        self._was_connected = False
        self._closed = False
        self._watcher: asyncio.Task[None] | None = None

    # -- connection -------------------------------------------------------------------------------------

    async def _connection(self) -> asyncssh.SSHClientConnection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        if self._lock is None:
            self._lock = asyncio.Lock()
            self._sftp_lock = asyncio.Lock()
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return self._conn
            if self._closed:
                raise TransportError(f"the connection to {self.description} was closed by offload")
            self._sftp = None
            if self._was_connected:  # a connection that was up dropped: come back, with backoff
                self._conn = await _RECONNECT.call(self._connect, _reconnectable, self._reconnecting)
            else:
                self._conn = await self._connect()
            self.stats["connects"] += 1
            self._budget = _SessionBudget(self.config.max_sessions)
            self._was_connected = True
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._conn))
            return self._conn

    def _reconnecting(self, _exc: Exception, pause: float) -> None:
        log.warning("connection to %s lost; reconnecting in %.1f s", self.description, pause)

    async def _connect(self) -> asyncssh.SSHClientConnection:
        config = self.config
        # Say what we wait for, when it takes a while (a host that takes TCP but never speaks SSH, a slow VPN).
        slow = asyncio.get_running_loop().call_later(
            1.0, lambda: log.info("connecting to %s (%s)...", config.name, self.description)
        )
        try:
            options = connect_options(config)
            direct = await direct_connector(config.host or "", options)
            if direct is not None:
                options["tunnel"] = direct
            conn = await asyncssh.connect(config.host, **options)
            skip_empty_ignores(conn)
            return conn
        except asyncssh.HostKeyNotVerifiable as exc:
            if config.host_keys:
                raise HostKeyError(
                    f"{self.description} presented a host key other than the one given for site '{config.name}' "
                    f"({config.source}; {exc.reason}): check the key with the site's admins"
                ) from None
            raise HostKeyError(
                f"the host key of {self.description} is not trusted by {known_hosts_path(config)} ({exc.reason}). "
                f"If you expect this host, check its fingerprint and run: offload sites trust {config.name}"
            ) from None
        except asyncssh.PermissionDenied:
            raise TransportError(
                f"{self.description} refused our keys. Check 'user' and 'identity_files' in the profile of "
                f"'{config.name}' ({config.source}), or load the key into your ssh-agent."
            ) from None
        except TimeoutError:
            raise TransportError(
                f"no SSH answer from {self.description} within {config.connect_timeout:g} s (connect_timeout in "
                f"the profile of '{config.name}'). Check its host and port, and that your network (VPN, jump "
                "host) lets you through."
            ) from None
        except (socket.gaierror, ConnectionRefusedError, OSError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise TransportError(
                f"cannot reach {self.description}: {reason}. Check the host and port of site "
                f"'{config.name}' and that your network (VPN, jump host) lets you through."
            ) from None
        except asyncssh.Error as exc:
            raise TransportError(f"SSH to {self.description} failed: {exc.reason}") from None
        finally:
            slow.cancel()

    async def _watch(self, conn: asyncssh.SSHClientConnection) -> None:
        """Bring port forwards back after a drop, without waiting for the next command."""
        with contextlib.suppress(Exception):
            await conn.wait_closed()
        if not self._closed and self._forwards and self._conn in (conn, None):
            with contextlib.suppress(TransportError):
                await self._connection()

    async def connect(self) -> None:
        """Open the connection now (it otherwise opens on first use)."""
        await self._connection()

    # -- session channels -------------------------------------------------------------------------------

    async def _open_session(
        self,
        what: str,
        open_channel: Callable[[asyncssh.SSHClientConnection], Awaitable[_C]],
        wait: float,
        on_close: Callable[[_C], None] | None = None,
    ) -> tuple[asyncssh.SSHClientConnection, _C]:
        """Open a session channel within the connection's budget (:class:`_SessionBudget`), waiting up to
        ``wait`` seconds for a free slot; the channel holds its slot until it closes, then ``on_close`` runs.

        A refusal never closes the connection: the forwards, carriers and SFTP session on it carry on. Only a
        channel that provably never opened is tried again: after a slot frees when the server refused it (its
        MaxSessions), and once on a fresh connection when the connection itself was gone.
        """
        reconnected = idle_retry = False
        while True:
            conn = await self._connection()
            budget = self._budget
            try:
                async with asyncio.timeout(wait):
                    await budget.acquire()
            except TimeoutError:
                raise SiteNotAnswering(
                    f"no SSH session free on {self.description} for {what} within {wait:g} s: the {budget.limit} "
                    "offload opens at once there are all held by relays, file transfers or commands (max_sessions "
                    f"in the profile of '{self.config.name}', and the server's MaxSessions). offload asks again "
                    "later; close forwards or shells you no longer use, or raise max_sessions if the site allows"
                ) from None
            try:
                channel = await open_channel(conn)
            except asyncssh.ChannelOpenError as exc:
                budget.release()
                error: Exception = exc
                if not (conn.is_closed() or self._conn is not conn):
                    if exc.code not in _REFUSALS:
                        raise TransportError(f"{self.description} would not open {what}: {exc.reason}") from None
                    if budget.refused():
                        continue  # wait for a slot to free, within the lowered budget
                    if not idle_retry:
                        # Nothing else is open; the server may not have counted out a channel that just closed.
                        idle_retry = True
                        await asyncio.sleep(0.2)
                        continue
                    raise TransportError(
                        f"{self.description} refused {what} with no other session open ({exc.reason}): its sshd "
                        "allows no commands or SFTP on a connection (MaxSessions 0, or a ForceCommand/Match "
                        "rule). Ask the site's admins; port forwards are not affected."
                    ) from None
            except (asyncssh.DisconnectError, ConnectionError) as exc:
                budget.release()
                error = exc
            except BaseException:
                budget.release()
                raise
            else:
                self._keep(self._hold(budget, channel, on_close))
                return conn, channel
            # The connection is gone and the channel never opened: safe to try once on a fresh connection.
            self._drop(conn)
            if reconnected:
                raise TransportError(f"cannot open a channel on {self.description}: {error}") from None
            reconnected = True

    @staticmethod
    async def _hold(budget: _SessionBudget, channel: _C, on_close: Callable[[_C], None] | None) -> None:
        """Give the channel's slot back once it has closed (then the server no longer counts it either)."""
        try:
            with contextlib.suppress(Exception):
                await channel.wait_closed()
        finally:
            budget.release()
            if on_close is not None:
                on_close(channel)

    def _keep(self, work: Awaitable[object]) -> None:
        """Run ``work`` past the call that started it; :meth:`close` ends what is left."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Future[object]) -> None:
        self._background.discard(task)  # type: ignore[arg-type]
        if not task.cancelled() and task.exception() is not None:
            log.debug("a background SSH task on %s ended: %r", self.description, task.exception())

    # -- commands ---------------------------------------------------------------------------------------

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | bytes | None = None,
        check: bool = True,
        timeout: float | None = None,
    ) -> CommandResult:
        command = shlex.join(argv)
        data = input.encode() if isinstance(input, str) else input
        self.stats[f"run:{argv[0]}"] += 1
        limit = timeout if timeout is not None else self.config.command_timeout
        conn, process = await self._open_session(
            repr(argv[0]), lambda conn: conn.create_process(command, encoding=None), limit
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(data), limit)
        except TimeoutError:
            with contextlib.suppress(Exception):
                process.kill()  # a signal for the command, if sshd passes it on
            process.close()  # and the channel goes, so nothing waits on it
            raise SiteNotAnswering(
                f"the site is not answering: {argv[0]!r} on {self.description} did not finish within "
                f"{limit:g} s (command_timeout in the profile of '{self.config.name}'); offload asks again "
                "later, and the jobs keep running there"
            ) from None
        except asyncio.CancelledError:
            process.close()
            raise
        except (asyncssh.Error, ConnectionError) as exc:
            self._drop(conn)
            raise TransportError(
                f"connection to {self.description} failed while running {argv[0]!r}: {exc}. "
                "The command may or may not have run on the site."
            ) from None
        status = process.exit_status if process.exit_status is not None else 255
        result = CommandResult(
            tuple(argv),
            status,
            (stdout or b"").decode("utf-8", "replace"),
            (stderr or b"").decode("utf-8", "replace"),
        )
        return result.check() if check else result

    async def start(self, argv: Sequence[str]) -> _SSHProcess:
        self.stats[f"start:{argv[0]}"] += 1
        try:
            _, process = await self._open_session(
                repr(argv[0]),
                lambda conn: conn.create_process(shlex.join(argv), encoding=None),
                self.config.command_timeout,
            )
        except (asyncssh.Error, ConnectionError) as exc:
            raise TransportError(f"cannot start {argv[0]!r} on {self.description}: {exc}") from None
        return _SSHProcess(process)

    def _drop(self, conn: asyncssh.SSHClientConnection) -> None:
        """End a connection that failed; the next call opens a new one (an aborted connection reads as open
        until asyncssh has cleaned it up, so it is forgotten at once)."""
        if self._conn is conn:
            self._conn = None
            conn.abort()

    async def interactive(self, argv: Sequence[str]) -> int:
        import os
        import shutil
        import sys
        import termios
        import tty

        tty_in = sys.stdin.isatty()
        size = shutil.get_terminal_size()
        _, process = await self._open_session(
            repr(argv[0]),
            lambda conn: conn.create_process(
                shlex.join(argv), term_type=os.environ.get("TERM", "xterm") if tty_in else None,
                term_size=(size.columns, size.lines) if tty_in else None, encoding=None,
                stdin=_redirect(sys.stdin, "rb"), stdout=_redirect(sys.stdout, "wb"),
                stderr=_redirect(sys.stderr, "wb"),
            ),
            self.config.command_timeout,
        )  # fmt: skip
        saved = termios.tcgetattr(sys.stdin.fileno()) if tty_in else None
        try:
            if tty_in:
                tty.setraw(sys.stdin.fileno())
            await process.wait_closed()
        finally:
            if saved is not None:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved)
        return process.exit_status if process.exit_status is not None else 255

    # -- files ------------------------------------------------------------------------------------------

    async def _sftp_client(self) -> asyncssh.SFTPClient:
        """The SFTP session: opened on first use, and again once it has ended (its channel closed while SSH
        stayed up: an sftp-server that crashed or was killed, or one offload gave up on)."""
        await self._connection()
        assert self._sftp_lock is not None
        async with self._sftp_lock:
            if self._sftp is None:
                limit = self.config.command_timeout
                try:
                    _, self._sftp = await self._open_session(
                        "an SFTP session",
                        lambda conn: asyncio.wait_for(conn.start_sftp_client(), limit),
                        limit,
                        on_close=self._forget_sftp,
                    )
                except TimeoutError:
                    raise SiteNotAnswering(
                        f"the site is not answering: the SFTP session on {self.description} did not start within "
                        f"{limit:g} s (command_timeout in the profile of '{self.config.name}'); the home "
                        "directory's file system may hang there. Try again later."
                    ) from None
                except asyncssh.Error as exc:
                    raise TransportError(f"SFTP is not available on {self.description}: {exc}") from None
            return self._sftp

    def _forget_sftp(self, sftp: asyncssh.SFTPClient) -> None:
        if self._sftp is sftp:
            self._sftp = None

    async def _file_op(
        self,
        what: str,
        op: Callable[[asyncssh.SFTPClient], Awaitable[_T]],
        moved: Callable[[], int] | None = None,
    ) -> _T:
        """Run one file operation on the SFTP session, bounded like a command.

        sftp-server answers one request at a time, so a read stuck on a hung file system stalls every file
        operation behind it: an operation that takes longer than ``command_timeout`` (a transfer, with
        ``moved`` giving its bytes so far: one that moves nothing for that long) raises
        :class:`SiteNotAnswering` and its session is given up; the next operation opens a new one. A session
        that ends under an operation is reopened and the operation run again, once.
        """
        limit = self.config.command_timeout
        for attempt in range(2):
            sftp = await self._sftp_client()
            task = asyncio.ensure_future(op(sftp))
            try:
                finished = await _finishes(task, limit, moved)
            except BaseException:
                task.cancel()
                self._keep(task)
                raise
            if not finished:
                self._forget_sftp(sftp)
                sftp.exit()  # a server that answers again ends the session (and frees its slot) then
                self._keep(task)  # the stuck request can only end with its session
                stalled = f"moved no data for {limit:g} s" if moved else f"did not finish within {limit:g} s"
                raise SiteNotAnswering(
                    f"the site is not answering: {what} on {self.description} {stalled} (command_timeout in the "
                    f"profile of '{self.config.name}'); a file system there may hang. offload gave up that SFTP "
                    "session and opens a new one for the next file operation: try again later."
                )
            try:
                return task.result()
            except _SFTP_GONE as exc:
                self._forget_sftp(sftp)
                if attempt:
                    raise TransportError(
                        f"the SFTP session on {self.description} ended during {what}, and again on a new session "
                        f"({exc}). Check that the site still accepts SFTP (sftp {self.config.host}), then try again."
                    ) from None
                log.info("the SFTP session on %s ended (%s); opening a new one", self.description, exc)
        raise AssertionError("unreachable")

    async def home(self) -> str:
        if self._home is None:
            self._home = await self._file_op("finding the home directory", lambda sftp: sftp.realpath("."))
        return self._home

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        async def write(sftp: asyncssh.SFTPClient) -> None:
            async with sftp.open(path, "wb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
                await f.write(data)
            await sftp.chmod(path, mode)

        self.stats["sftp:write"] += 1
        try:
            await self._file_op(f"writing {path}", write)
        except asyncssh.SFTPError as exc:
            raise TransportError(f"cannot write {path} on {self.description}: {exc.reason}") from None

    async def read_file(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        async def read(sftp: asyncssh.SFTPClient) -> bytes:
            async with sftp.open(path, "rb") as f:
                # Only what the file holds now is asked for. asyncssh splits a read into parallel requests of
                # the server's largest size, and a follower's read of a quiet log (READ_CHUNK, 4 MiB) was 17
                # requests past its end every poll; cancelled (a cluster closing), those ended unretrieved,
                # each printing "Task exception was never retrieved ... SFTPEOFError" (asyncssh's reader does
                # not cancel its requests). A file at its end costs one stat.
                end = (await f.stat()).size
                if end is None:  # a server that does not say: read until it says EOF
                    return await f.read(-1 if size is None else size, max(0, offset))
                start = max(0, end + offset) if offset < 0 else offset  # negative: the last -offset bytes
                length = end - start if size is None else min(size, end - start)
                return await f.read(length, start) if length > 0 else b""

        self.stats["sftp:read"] += 1
        try:
            return await self._file_op(f"reading {path}", read)
        except asyncssh.SFTPNoSuchFile:
            return b""
        except asyncssh.SFTPError as exc:
            raise TransportError(f"cannot read {path} on {self.description}: {exc.reason}") from None

    async def put(self, local: str, remote: str, *, mode: int = 0o600, resume: bool = False,
                  progress: Progress | None = None) -> None:  # fmt: skip
        import os

        self.stats["sftp:put"] += 1
        total = os.stat(local).st_size
        moved = 0

        async def send_file(sftp: asyncssh.SFTPClient) -> None:
            start = 0
            if resume:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    size = (await sftp.stat(remote)).size or 0
                    # Chunks go two at a time, so below the last two chunks of a partial copy everything is there.
                    start = max(0, (min(size, total) // _CHUNK - _CHUNKS_IN_FLIGHT) * _CHUNK)
            done = start
            offsets = iter(range(start, total, _CHUNK))
            async with sftp.open(remote, "r+b" if start else "wb", attrs=asyncssh.SFTPAttrs(permissions=mode)) as f:
                with open(local, "rb") as src:

                    async def send() -> None:
                        nonlocal done, moved
                        for offset in offsets:
                            chunk = os.pread(src.fileno(), _CHUNK, offset)
                            await f.write(chunk, offset)
                            done += len(chunk)
                            moved += len(chunk)
                            if progress:
                                progress(done, total)

                    await asyncio.gather(*(send() for _ in range(_CHUNKS_IN_FLIGHT)))
                if start and (await f.stat()).size != total:
                    await f.truncate(total)
            await sftp.chmod(remote, mode)

        try:
            await self._file_op(f"sending {local} to {remote}", send_file, moved=lambda: moved)
        except asyncssh.SFTPError as exc:
            raise TransportError(f"cannot write {remote} on {self.description}: {exc.reason}") from None
        except (asyncssh.Error, ConnectionError) as exc:
            raise TransportError(f"the connection to {self.description} failed while sending {local}: {exc}. "
                                 "Run it again to carry on where it stopped.") from None  # fmt: skip
        if progress and not total:
            progress(0, 0)

    async def get(self, remote: str, local: str, *, progress: Progress | None = None) -> None:
        self.stats["sftp:get"] += 1
        moved = 0

        def handler(_src: bytes, _dst: bytes, done: int, total: int) -> None:
            nonlocal moved
            moved = done
            if progress:
                progress(done, total)

        async def fetch(sftp: asyncssh.SFTPClient) -> None:
            await sftp.get(remote, local, max_requests=128, progress_handler=handler)

        try:
            await self._file_op(f"fetching {remote}", fetch, moved=lambda: moved)
        except asyncssh.SFTPError as exc:
            raise TransportError(f"cannot read {remote} on {self.description}: {exc.reason}") from None
        except (asyncssh.Error, ConnectionError) as exc:
            detail = f"the connection to {self.description} failed while fetching {remote}: {exc}"
            raise TransportError(detail) from None

    # -- forwards ---------------------------------------------------------------------------------------

    async def forward_local_port(self, remote_host: str, remote_port: int, local_port: int = 0) -> SSHForward:
        await self._connection()  # a site that cannot be reached says so now, not at the first connection
        forward = SSHForward(self._connection, remote_host, remote_port, open_forwards=self._forwards)
        await forward.listen(local_port)
        return forward

    async def close(self) -> None:
        self._closed = True
        for forward in list(self._forwards):
            await forward.close()
        if self._conn is not None:
            self._conn.close()
            with contextlib.suppress(Exception):
                await self._conn.wait_closed()
        if self._watcher is not None:
            self._watcher.cancel()
        # With the connection closed, what was left on its channels ends on its own (slot holders, file operations
        # a stuck session had): given a moment to, so asyncssh's own tasks under them end cleanly, then cancelled.
        if self._background:
            _, left = await asyncio.wait(list(self._background), timeout=1)
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left, timeout=5)


async def fetch_host_key(config: SiteConfig) -> asyncssh.SSHKey:
    """The key the site presents, without trusting it (for ``offload sites trust``)."""
    options = connect_options(config, verify_host_key=False)
    kwargs = {k: v for k, v in options.items() if k in ("port", "tunnel", "config")}
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(config.host, **kwargs), config.connect_timeout)
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        raise TransportError(f"cannot reach {config.host} to read its host key: {exc}") from None
    if key is None:
        raise TransportError(f"{config.host} presented no host key")
    return key


async def known_hosts_line(config: SiteConfig, key: asyncssh.SSHKey) -> str:
    """The known_hosts line that makes this profile connect: under the real ``HostName``/``Port`` of an
    ``~/.ssh/config`` alias (or its ``HostKeyAlias``), as asyncssh looks the key up."""
    host, port, alias = await resolved_target(config)
    name = alias or host
    pattern = f"[{name}]:{port}" if port and port != 22 else name
    return f"{pattern} {key.export_public_key('openssh').decode().strip()}\n"
