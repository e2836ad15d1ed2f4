"""The site connection's coalescing of asyncssh's writes (offload/transports/ssh_coalesce.py): what asyncssh
writes in one step of the loop reaches the socket as one write, nothing waits longer than that step, and the
connection is direct only where asyncssh would have made a direct one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest

from offload.transports import ssh_coalesce
from offload.transports.ssh_coalesce import CoalescingTransport, direct_connector, skip_empty_ignores


class RecordingTransport(asyncio.Transport):
    """The socket transport's seam: records the writes it is handed."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data) -> None:
        self.writes.append(bytes(data))

    def writelines(self, list_of_data) -> None:
        self.writes.append(b"".join(list_of_data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0


async def test_writes_made_in_one_step_reach_the_socket_as_one_at_its_end():
    inner = RecordingTransport()
    coalescing = CoalescingTransport(inner, asyncio.get_running_loop())
    coalescing.write(b"ignore")  # asyncssh's SSH_MSG_IGNORE, then the data packet it precedes
    coalescing.write(b"data")
    assert inner.writes == [] and coalescing.get_write_buffer_size() == 10
    await asyncio.sleep(0)
    assert inner.writes == [b"ignoredata"] and coalescing.get_write_buffer_size() == 0
    coalescing.write(b"next")
    await asyncio.sleep(0)
    assert inner.writes == [b"ignoredata", b"next"]


async def test_a_large_write_goes_at_once():
    inner = RecordingTransport()
    coalescing = CoalescingTransport(inner, asyncio.get_running_loop())
    coalescing.write(b"a")
    coalescing.write(b"b" * ssh_coalesce.FLUSH_AT)
    assert inner.writes == [b"a" + b"b" * ssh_coalesce.FLUSH_AT]
    await asyncio.sleep(0)
    assert len(inner.writes) == 1


async def test_close_sends_what_waits_and_abort_drops_it():
    loop = asyncio.get_running_loop()
    inner = RecordingTransport()
    coalescing = CoalescingTransport(inner, loop)
    coalescing.write(b"disconnect")
    coalescing.close()
    assert inner.writes == [b"disconnect"] and inner.closed
    inner = RecordingTransport()
    coalescing = CoalescingTransport(inner, loop)
    coalescing.write(b"lost")
    coalescing.abort()
    await asyncio.sleep(0)
    assert inner.writes == [] and inner.aborted


class LoginNode:
    """A real asyncssh server on 127.0.0.1 that runs commands (``ran COMMAND``) and allows forwards, and a TCP
    sink beside it that answers how many bytes it took once its client is done sending."""

    def __init__(self, server: asyncssh.SSHAcceptor, sink: asyncio.AbstractServer, received: bytearray,
                 client_key: asyncssh.SSHKey) -> None:  # fmt: skip
        self.port = server.sockets[0].getsockname()[1]
        self.sink_port = sink.sockets[0].getsockname()[1]
        self.received = received
        self.options = {"port": self.port, "username": "u", "client_keys": [client_key], "known_hosts": None,
                        "config": []}  # fmt: skip


@contextlib.asynccontextmanager
async def login_node(**server_options: object) -> AsyncIterator[LoginNode]:
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    received = bytearray()

    async def sink(reader, writer) -> None:
        while chunk := await reader.read(1 << 16):
            received.extend(chunk)
        writer.write(str(len(received)).encode())
        await writer.drain()
        writer.close()

    class Server(asyncssh.SSHServer):
        def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
            return True

    async def process(proc) -> None:
        proc.stdout.write(f"ran {proc.command}\n")
        proc.exit(0)

    target = await asyncio.start_server(sink, "127.0.0.1", 0)
    server = await asyncssh.create_server(
        Server, "127.0.0.1", 0, server_host_keys=[host_key], process_factory=process,
        authorized_client_keys=asyncssh.import_authorized_keys(client_key.export_public_key().decode()),
        **server_options,
    )  # fmt: skip
    try:
        yield LoginNode(server, target, received, client_key)
    finally:
        server.close()
        target.close()
        await server.wait_closed()
        await target.wait_closed()


async def test_an_ssh_connection_through_the_connector_carries_commands_and_a_large_upload(tmp_path, monkeypatch):
    """A real asyncssh server and client on 127.0.0.1, the client's TCP connection made by the connector."""
    joined: list[int] = []  # how many of asyncssh's writes each socket write carried
    flush = CoalescingTransport.flush

    def counting_flush(self) -> None:
        joined.append(len(self._pending))
        flush(self)

    monkeypatch.setattr(CoalescingTransport, "flush", counting_flush)
    async with login_node() as node:
        connector = await direct_connector("127.0.0.1", node.options)
        assert connector is not None
        async with asyncssh.connect("127.0.0.1", tunnel=connector, **node.options) as conn:
            assert (await conn.run("hostname", check=True)).stdout == "ran hostname\n"
            reader, writer = await conn.open_connection("127.0.0.1", node.sink_port)
            payload = bytes(range(256)) * (32 << 10)  # 8 MiB: 256 data packets, each after an SSH_MSG_IGNORE
            for i in range(0, len(payload), 1 << 20):
                writer.write(payload[i : i + (1 << 20)])
                await writer.drain()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 30) == str(len(payload)).encode()
            assert bytes(node.received) == payload
        assert max(joined) >= 16  # a 1 MiB write: 32 data packets and their IGNOREs, in a few socket writes


@pytest.mark.parametrize(("cipher", "skip", "expect_ignores"), [
    ("aes128-gcm@openssh.com", True, False),
    ("chacha20-poly1305@openssh.com", True, False),
    ("aes128-gcm@openssh.com", False, True),  # asyncssh alone: one before every packet
    ("aes128-cbc", True, True),  # CBC: the countermeasure stays
])  # fmt: skip
async def test_the_empty_ignore_before_each_packet_is_skipped_unless_the_cipher_is_cbc(
    monkeypatch, cipher, skip, expect_ignores
):
    """What a real asyncssh server receives from the client while it runs a command and takes a 1 MiB upload
    through a forwarded channel (counted in the server's handler of SSH_MSG_IGNORE)."""
    from asyncssh.connection import SSHConnection

    ignores = {"server": 0}
    handle = SSHConnection._packet_handlers[2]

    def counting(conn, pkttype, pktid, packet):
        if conn.is_server():
            ignores["server"] += 1
        return handle(conn, pkttype, pktid, packet)

    monkeypatch.setitem(SSHConnection._packet_handlers, 2, counting)
    async with login_node(encryption_algs=[cipher]) as node:
        async with asyncssh.connect("127.0.0.1", encryption_algs=[cipher], **node.options) as conn:
            if skip:
                skip_empty_ignores(conn)
            assert conn.get_extra_info("send_cipher") == cipher
            ignores["server"] = 0  # those of the authentication, sent before the connection is returned
            assert (await conn.run("true", check=True)).stdout == "ran true\n"
            reader, writer = await conn.open_connection("127.0.0.1", node.sink_port)
            writer.write(bytes(1 << 20))
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 30) == str(1 << 20).encode()
        assert (ignores["server"] > 0) is expect_ignores, ignores


async def test_a_jump_host_or_proxy_command_keeps_asyncssh_s_own_path(tmp_path: Path):
    config = tmp_path / "ssh_config"
    config.write_text("Host bastioned\n  ProxyJump gateway\nHost proxied\n  ProxyCommand nc %h %p\n")
    base = {"config": [str(config)], "known_hosts": None, "agent_path": None}
    assert await direct_connector("plain", base) is not None
    assert await direct_connector("plain", {**base, "tunnel": "gateway"}) is None  # the profile's jump_host
    assert await direct_connector("bastioned", base) is None
    assert await direct_connector("proxied", base) is None


async def test_the_address_family_of_the_users_ssh_config_is_kept(tmp_path: Path):
    config = tmp_path / "ssh_config"
    config.write_text("Host v4\n  AddressFamily inet\n")
    connector = await direct_connector("v4", {"config": [str(config)], "known_hosts": None, "agent_path": None})
    assert connector is not None and connector.family == socket.AF_INET


@pytest.fixture(autouse=True)
def _no_user_ssh_config(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
