"""The SSH transport against a throwaway asyncssh server on 127.0.0.1, built to misbehave the way real sites do:
an sshd that refuses session channels beyond its ``MaxSessions``, an SFTP session that dies while SSH stays up,
and a read that hangs on a stuck parallel file system. Host keys are checked against a known_hosts file."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shlex
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import asyncssh
import pytest

from offload import load_profiles
from offload.errors import HostKeyError, SiteNotAnswering, TransportError
from offload.plugins import plugins
from offload.transports.ssh import SSHTransport

T = TypeVar("T")


class FakeSSHSite:
    """The server's behaviour and what it saw: sessions open at once, refusals, SFTP sessions started."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.root = tmp_path / "remote"
        self.root.mkdir()
        self.session_limit = 10  # sshd's MaxSessions
        self.open_sessions = 0
        self.peak_sessions = 0
        self.refused = 0
        self.sftp_sessions: list[asyncssh.SFTPServer] = []
        self.sftp_reads: list[tuple[int, int]] = []  # (offset, size) of each read request
        self.close_sftp_on_request = False  # every SFTP session ends at its first request
        self.unhang = asyncio.Event()
        self.port = 0
        self._transports: list[SSHTransport] = []

    def transport(self, **profile: object) -> SSHTransport:
        """A transport made as a Site makes it: from a profile in a sites file, through the plugin registry."""
        keys = {
            "host": "127.0.0.1",
            "port": self.port,
            "user": "tester",
            "identity_files": [str(self.tmp_path / "id_client")],
            "known_hosts": str(self.tmp_path / "known_hosts"),
            "ssh_config": [str(self.tmp_path / "ssh_config")],  # the user's ~/.ssh/config stays out of it
            "agent": False,
            "keepalive": 0,
            **profile,
        }
        lines = "".join(f"{key} = {_toml(value)}\n" for key, value in keys.items())
        (self.tmp_path / "sites.toml").write_text(f"[sites.fake]\n{lines}")
        config = load_profiles(self.tmp_path / "sites.toml").sites["fake"]
        transport = plugins().transport(config.transport).factory(config)
        self._transports.append(transport)
        return transport

    async def close(self) -> None:
        self.unhang.set()
        for transport in self._transports:
            await transport.close()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return '"' + value + '"'
    return str(value)


class _Session(asyncssh.SSHServerProcess):
    """A session channel, counted as sshd counts it against MaxSessions while it is open."""

    def __init__(self, site: FakeSSHSite) -> None:
        super().__init__(_command, lambda chan: _SFTPServer(chan, site), 3, False)
        self._site = site

    def connection_lost(self, exc: Exception | None) -> None:
        self._site.open_sessions -= 1
        super().connection_lost(exc)


class _Server(asyncssh.SSHServer):
    def __init__(self, site: FakeSSHSite) -> None:
        self._site = site

    def session_requested(self) -> _Session:
        if self._site.open_sessions >= self._site.session_limit:
            self._site.refused += 1
            # What OpenSSH's sshd answers beyond MaxSessions.
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "open failed")
        self._site.open_sessions += 1  # counted from the open, as sshd does, until the channel has closed
        self._site.peak_sessions = max(self._site.peak_sessions, self._site.open_sessions)
        return _Session(self._site)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        return True  # direct-tcpip (port forwards): asyncssh connects to dest itself


async def _command(process: asyncssh.SSHServerProcess) -> None:
    """A tiny login node: ``echo WORDS``, ``pause SECONDS`` (then prints done), ``cat`` (a relay's carrier)."""
    argv = shlex.split(process.command or "")
    if argv[0] == "echo":
        process.stdout.write((" ".join(argv[1:]) + "\n").encode())
    elif argv[0] == "pause":
        await asyncio.sleep(float(argv[1]))
        process.stdout.write(b"done\n")
    elif argv[0] == "cat":
        while data := await process.stdin.read(65536):
            process.stdout.write(data)
    process.exit(0)


class _SFTPServer(asyncssh.SFTPServer):
    def __init__(self, chan: asyncssh.SSHServerChannel, site: FakeSSHSite) -> None:
        super().__init__(chan, chroot=str(site.root).encode())
        self._site = site
        self._hanging: set[object] = set()
        site.sftp_sessions.append(self)

    def open(self, path: bytes, pflags: int, attrs: asyncssh.SFTPAttrs) -> object:
        if self._site.close_sftp_on_request:
            self.channel.close()
        file_obj = super().open(path, pflags, attrs)
        if b"hang" in path:
            self._hanging.add(file_obj)
        return file_obj

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        self._site.sftp_reads.append((offset, size))
        if file_obj in self._hanging:
            await self._site.unhang.wait()  # a read stuck on a hung file system
        return super().read(file_obj, offset, size)


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[FakeSSHSite]:
    fake = FakeSSHSite(tmp_path)
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key.write_private_key(tmp_path / "id_client")
    (tmp_path / "ssh_config").write_text("")
    server = await asyncssh.create_server(
        lambda: _Server(fake),
        "127.0.0.1",
        0,
        server_host_keys=[host_key],
        encoding=None,
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
    )
    fake.port = server.sockets[0].getsockname()[1]
    public = host_key.export_public_key().decode().strip()
    (tmp_path / "known_hosts").write_text(f"[127.0.0.1]:{fake.port} {public}\n")
    try:
        yield fake
    finally:
        await fake.close()
        server.close()
        await server.wait_closed()
    for _ in range(100):  # the server's side of each connection ends a few loop turns after the client's
        left = asyncio.all_tasks() - {asyncio.current_task()}
        if not left:
            break
        await asyncio.sleep(0.01)
    assert not left, f"tasks left behind: {left}"


async def within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, or a test failure if it takes longer. (``asyncio.wait_for`` would wait for a
    cancelled SFTP call to finish its cleanup, which a hung server never lets it do.)"""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()
        pytest.fail(f"still waiting after {seconds} s")
    return task.result()


async def _carrier_echoes(process: object) -> bool:
    """Whether a long-lived ``cat`` channel still carries bytes both ways."""
    process.stdin.write(b"ping")  # type: ignore[attr-defined]
    return await asyncio.wait_for(process.stdout.readexactly(4), 5) == b"ping"  # type: ignore[attr-defined]


# -- 1. a refused session channel ---------------------------------------------------------------------------


async def test_a_refused_channel_keeps_the_connection_and_waits_for_a_free_slot(site):
    """sshd at its MaxSessions refuses the next session: the call waits for a slot instead of aborting the
    connection, so the relay carrier and the SFTP session on it live on."""
    site.session_limit = 2
    transport = site.transport()
    (site.root / "f").write_bytes(b"data")
    carrier = await transport.start(["cat"])
    assert await transport.read_file("f") == b"data"  # the SFTP session: the second long-lived session

    async def end_carrier_soon() -> None:
        await asyncio.sleep(0.3)
        carrier.close()

    ender = asyncio.create_task(end_carrier_soon())
    try:
        assert await transport.run(["pause", "0.5"]) is not None
    finally:
        await ender
    assert site.refused == 1
    assert transport.stats["connects"] == 1
    assert await transport.read_file("f") == b"data"
    assert len(site.sftp_sessions) == 1  # the same SFTP session served both reads


async def test_sessions_beyond_the_budget_queue_instead_of_being_refused(site):
    site.session_limit = 3
    transport = site.transport(max_sessions=3)
    (site.root / "f").write_bytes(b"data")
    carrier = await transport.start(["cat"])
    assert await transport.read_file("f") == b"data"
    results = await asyncio.gather(*(transport.run(["pause", "0.05"]) for _ in range(5)))
    assert [r.stdout for r in results] == ["done\n"] * 5
    assert site.refused == 0
    assert site.peak_sessions == 3
    assert await _carrier_echoes(carrier)
    carrier.close()


async def test_a_server_limit_below_the_budget_lowers_the_budget(site):
    """The profile allows 8 sessions, the server 3: the refused commands wait and run, nothing is lost."""
    site.session_limit = 3
    transport = site.transport(max_sessions=8)
    carrier = await transport.start(["cat"])
    results = await asyncio.gather(*(transport.run(["pause", "0.05"]) for _ in range(6)))
    assert [r.stdout for r in results] == ["done\n"] * 6
    assert transport.stats["connects"] == 1
    assert await _carrier_echoes(carrier)
    assert site.peak_sessions == 3
    refused = site.refused
    await asyncio.gather(*(transport.run(["echo", "x"]) for _ in range(6)))
    assert site.refused == refused  # the budget learned the server's limit: no more refusals
    carrier.close()


async def test_a_carrier_holds_its_slot_until_it_closes(site):
    site.session_limit = 1
    transport = site.transport(max_sessions=1, command_timeout=0.3)
    carrier = await transport.start(["cat"])
    with pytest.raises(SiteNotAnswering, match="max_sessions"):
        await transport.run(["echo", "x"])
    assert site.refused == 0  # it waited for a slot; it did not ask the server
    carrier.close()
    assert (await transport.run(["echo", "x"])).stdout == "x\n"
    assert transport.stats["connects"] == 1


async def test_a_server_that_refuses_every_session_fails_clearly_and_keeps_the_connection(site):
    site.session_limit = 0  # MaxSessions 0: no commands, no SFTP; port forwards still work
    transport = site.transport()
    with pytest.raises(TransportError, match="MaxSessions"):
        await within(10, transport.run(["echo", "x"]))
    assert transport.stats["connects"] == 1


async def test_port_forwards_are_not_counted_as_sessions(site):
    """sshd's MaxSessions counts shells, commands and subsystems, not direct-tcpip channels: a forward opens
    while every session slot is taken."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    target = await asyncio.start_server(echo, "127.0.0.1", 0)
    site.session_limit = 1
    transport = site.transport(max_sessions=1)
    carrier = await transport.start(["cat"])
    forward = await transport.forward_local_port("127.0.0.1", target.sockets[0].getsockname()[1])
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", forward.local_port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.close()
        await writer.wait_closed()
        assert site.refused == 0
    finally:
        carrier.close()
        await forward.close()
        target.close()
        await target.wait_closed()


async def test_the_site_connection_is_made_by_the_coalescing_connector_unless_it_is_tunnelled(site, monkeypatch):
    """Direct: offload's connector opens the TCP connection (asyncssh's writes joined per loop step). With a
    ProxyCommand in the user's ssh config asyncssh keeps its own path."""
    from offload.transports.ssh_coalesce import DirectConnector

    opened: list[tuple[str, int]] = []
    create = DirectConnector.create_connection

    async def counting(self, factory, host, port):
        opened.append((host, port))
        return await create(self, factory, host, port)

    monkeypatch.setattr(DirectConnector, "create_connection", counting)
    direct = site.transport()
    assert (await direct.run(["echo", "hi"])).stdout.strip() == "hi"
    assert opened == [("127.0.0.1", site.port)]
    # and the empty SSH_MSG_IGNORE before each packet is skipped (test_ssh_coalesce shows what the server gets)
    assert "skip_empty_ignores" in (await direct._connection()).send_packet.__qualname__
    (site.tmp_path / "ssh_config").write_text(f"Host 127.0.0.1\n  ProxyCommand nc 127.0.0.1 {site.port}\n")
    proxied = site.transport()
    with contextlib.suppress(TransportError, OSError):  # nc may be missing: what matters is who connected
        await proxied.run(["echo", "hi"])
    assert opened == [("127.0.0.1", site.port)]


# -- 2. a dead SFTP session -----------------------------------------------------------------------------------


@pytest.mark.parametrize("noticed", [True, False], ids=["after-it-ended", "while-it-ends"])
async def test_a_dead_sftp_session_is_replaced(site, noticed):
    transport = site.transport()
    (site.root / "f").write_bytes(b"data")
    assert await transport.read_file("f") == b"data"
    site.sftp_sessions[0].channel.close()  # the SFTP session ends; SSH stays up
    if noticed:
        await asyncio.sleep(0.2)
    assert await within(10, transport.read_file("f")) == b"data"
    await transport.write_file("g", b"more")
    assert (site.root / "g").read_bytes() == b"more"
    assert len(site.sftp_sessions) == 2
    assert transport.stats["connects"] == 1


async def test_an_sftp_session_that_keeps_dying_fails_clearly_after_one_reopen(site):
    site.close_sftp_on_request = True
    transport = site.transport()
    (site.root / "f").write_bytes(b"data")
    with pytest.raises(TransportError, match="SFTP session"):
        await within(10, transport.read_file("f"))
    assert len(site.sftp_sessions) == 2  # the first, and one reopened
    assert transport.stats["connects"] == 1


# -- 3. a file operation that hangs ---------------------------------------------------------------------------


async def test_a_hung_read_times_out_and_the_next_operation_gets_a_new_session(site):
    transport = site.transport(command_timeout=0.5)
    (site.root / "f").write_bytes(b"data")
    (site.root / "hang.log").write_bytes(b"log")
    with pytest.raises(SiteNotAnswering, match="command_timeout"):
        await within(10, transport.read_file("hang.log"))
    assert await within(10, transport.read_file("f")) == b"data"
    assert len(site.sftp_sessions) == 2
    assert transport.stats["connects"] == 1


async def test_a_hung_get_times_out(site, tmp_path):
    transport = site.transport(command_timeout=0.5)
    (site.root / "hang.bin").write_bytes(b"bin" * 1000)
    with pytest.raises(SiteNotAnswering, match="command_timeout"):
        await within(10, transport.get("hang.bin", str(tmp_path / "local.bin")))


async def test_put_resumes_and_get_fetches_within_the_bounds(site, tmp_path):
    """Transfers run inside the same bound (no byte moved for command_timeout): a healthy one is not cut."""
    transport = site.transport(command_timeout=5)
    local = tmp_path / "big.bin"
    local.write_bytes(bytes(range(256)) * (164 * 1024))  # 41 MiB: six chunks
    seen: list[tuple[int, int]] = []
    await transport.put(str(local), "big.bin", progress=lambda done, total: seen.append((done, total)))
    assert (site.root / "big.bin").read_bytes() == local.read_bytes()
    assert seen[-1] == (local.stat().st_size, local.stat().st_size)
    with open(site.root / "big.bin", "r+b") as partial:
        partial.truncate(33 << 20)  # an interrupted copy: all but the last two chunks in flight are there
    seen.clear()
    await transport.put(str(local), "big.bin", resume=True, progress=lambda done, total: seen.append((done, total)))
    assert (site.root / "big.bin").read_bytes() == local.read_bytes()
    assert seen[0][0] == 24 << 20  # it carried on from 16 MiB, it did not start again
    back = tmp_path / "back.bin"
    await transport.get("big.bin", str(back))
    assert back.read_bytes() == local.read_bytes()
    assert len(site.sftp_sessions) == 1


async def test_a_read_asks_only_for_what_the_file_holds(site):
    """A log follower asks for up to 4 MiB each poll: the requests stay within the file (one at its end asks
    for nothing), where asyncssh alone sends a parallel request for every block of the size asked, past the
    end too (17 a poll of a quiet log on OpenSSH's sftp-server; cancelled, they printed "Task exception was never
    retrieved")."""
    transport = site.transport()
    (site.root / "log").write_bytes(b"0123456789")
    assert await transport.read_file("log", 0, 4 << 20) == b"0123456789"
    assert site.sftp_reads == [(0, 10)]
    site.sftp_reads.clear()
    assert await transport.read_file("log", 10, 4 << 20) == b""
    assert await transport.read_file("log", 4, 3) == b"456"
    assert await transport.read_file("log", -4) == b"6789"  # the last bytes, as a tail reads them
    assert await transport.read_file("log", -40, 2) == b"01"
    assert await transport.read_file("log") == b"0123456789"
    assert site.sftp_reads == [(4, 3), (6, 4), (0, 2), (0, 10)]
    big = bytes(range(256)) * (8 << 12)  # 8 MiB: parallel requests, all within it
    (site.root / "big").write_bytes(big)
    site.sftp_reads.clear()
    assert await transport.read_file("big", 1 << 20, 4 << 20) == big[1 << 20 : 5 << 20]
    assert all(offset + size <= 5 << 20 for offset, size in site.sftp_reads)
    assert await transport.read_file("missing", 0, 10) == b""


# -- 5. a connection that drops -----------------------------------------------------------------------------


@pytest.fixture
def fast_reconnect(monkeypatch):
    """offload's reconnect policy as it is, with its pauses cut to milliseconds."""
    from offload.transports import ssh as ssh_mod

    policy = ssh_mod._RECONNECT
    monkeypatch.setattr(ssh_mod, "_RECONNECT", dataclasses.replace(policy, first=0.001, cap=0.004))
    return policy


async def test_a_dropped_connection_comes_back_with_backoff(site, fast_reconnect, monkeypatch, caplog):
    transport = site.transport()
    assert (await transport.run(["echo", "one"])).stdout.strip() == "one"
    connect, failures = transport._connect, iter([TransportError("cannot reach it")] * 2)

    async def flaky() -> object:
        for failure in failures:
            raise failure
        return await connect()

    monkeypatch.setattr(transport, "_connect", flaky)
    transport._conn.close()  # the laptop slept; the site's sshd restarted
    await transport._conn.wait_closed()
    with caplog.at_level("WARNING", logger="offload.ssh"):
        assert (await transport.run(["echo", "two"])).stdout.strip() == "two"
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == [
        f"connection to {transport.description} lost; reconnecting"
    ] * 2
    assert transport.stats["connects"] == 2


async def test_a_dropped_connection_is_given_up_after_the_policys_attempts(site, fast_reconnect, monkeypatch):
    transport = site.transport()
    await transport.run(["echo", "one"])
    tries: list[type] = []

    async def refused(error: Exception) -> object:
        tries.append(type(error))
        raise error

    monkeypatch.setattr(transport, "_connect", lambda: refused(TransportError("cannot reach it")))
    transport._conn.close()
    await transport._conn.wait_closed()
    with pytest.raises(TransportError, match="cannot reach it"):
        await transport.run(["echo", "two"])
    assert len(tries) == fast_reconnect.attempts == 8
    tries.clear()
    monkeypatch.setattr(transport, "_connect", lambda: refused(HostKeyError("another host key")))
    with pytest.raises(HostKeyError):
        await transport.run(["echo", "three"])
    assert tries == [HostKeyError]  # never asked again: trusting a key is the user's act
