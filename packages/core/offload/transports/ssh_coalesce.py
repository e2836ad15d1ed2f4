"""The site's TCP connection, with the SSH packets asyncssh writes in one step of the event loop sent together.

asyncssh writes each SSH packet to the socket on its own, and sends an empty ``SSH_MSG_IGNORE`` packet before
every packet of the connection protocol (a countermeasure against traffic analysis, in every release): one
32 KiB data packet of an upload through a forward is two socket writes, and sshd takes no larger packets on a
forwarded channel. On a link that is not the bottleneck these system calls are: an upload of 200 MiB through
one channel ran at 394 MB/s with asyncssh's writes, 564 MB/s with them joined (medians of 4, issue 30). Here
what asyncssh writes while it handles one event (a local read, a window adjust, a command) is kept and handed to
the socket as one write when that step ends, or as soon as :data:`FLUSH_AT` bytes wait. Nothing waits longer
than one pass of the event loop.

It plugs in as asyncssh's ``tunnel`` (any object with ``create_connection``), for a direct connection only: a
jump host or a ``ProxyCommand`` keep asyncssh's own path (:func:`direct_connector`).

Those empty ``SSH_MSG_IGNORE`` packets are dropped too, on every connection (:func:`skip_empty_ignores`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncssh

# Bytes that wait no longer: about what asyncio reads from a socket in one go.
FLUSH_AT = 256 << 10
_MSG_IGNORE = 2  # RFC 4253, section 11.2
_EMPTY_STRING = b"\0\0\0\0"  # an SSH string of no bytes: what asyncssh's ignore packets carry


class CoalescingTransport(asyncio.Transport):
    """A TCP transport as asyncssh sees it: writes made in one step of the loop reach the socket as one."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_size = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        """Hand what waits to the socket (asyncio's transport writes it, or buffers what the socket refuses)."""
        if not self._pending:
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        if self._transport.is_closing():
            return
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self.flush()  # what asyncssh wrote last (a disconnect, a channel close) still goes out, as it would have
        self._transport.close()

    def abort(self) -> None:
        self._pending, self._pending_size = [], 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError("the SSH connection keeps its transport")

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()


class _Relay(asyncio.Protocol):
    """What asyncio's transport calls: passed on to asyncssh's connection, which writes to the coalescing one."""

    def __init__(self, connection: asyncio.Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self.connection = connection
        self._loop = loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.connection.connection_made(CoalescingTransport(transport, self._loop))

    def data_received(self, data: bytes) -> None:
        self.connection.data_received(data)

    def eof_received(self) -> bool | None:
        return self.connection.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection.connection_lost(exc)

    def pause_writing(self) -> None:
        self.connection.pause_writing()

    def resume_writing(self) -> None:
        self.connection.resume_writing()


class DirectConnector:
    """asyncssh's ``tunnel`` hook, used to open the site's TCP connection itself (no tunnel at all), with the
    address family and local address asyncssh would have used."""

    def __init__(self, family: int = 0, local_addr: tuple[str, int] | None = None) -> None:
        self.family = family
        self.local_addr = local_addr

    async def create_connection(
        self, session_factory: Callable[[], asyncio.Protocol], remote_host: str, remote_port: int
    ) -> tuple[asyncio.BaseTransport, asyncio.Protocol]:
        loop = asyncio.get_running_loop()
        transport, relay = await loop.create_connection(
            lambda: _Relay(session_factory(), loop),
            remote_host,
            remote_port,
            family=self.family,
            local_addr=self.local_addr,
        )
        return transport, relay.connection

    def close(self) -> None:
        """Nothing to close: the connection's transport is the socket's."""

    async def wait_closed(self) -> None:
        """Nothing to wait for (see :meth:`close`)."""


async def direct_connector(host: str, options: dict[str, object]) -> DirectConnector | None:
    """The connector for ``asyncssh.connect(host, **options)``, or None when the connection is not direct: the
    profile or the user's ``~/.ssh/config`` names a jump host or a proxy command, which asyncssh handles."""
    if options.get("tunnel"):
        return None
    probe = {k: v for k, v in options.items() if k != "known_hosts"}
    try:
        resolved = await asyncssh.SSHClientConnectionOptions.construct(None, host=host, **probe)
    except (asyncssh.Error, OSError, ValueError):
        return None  # let asyncssh.connect report it, as it would have
    if resolved.tunnel or resolved.proxy_command:
        return None
    return DirectConnector(resolved.family or 0, resolved.local_addr or None)


def skip_empty_ignores(conn: asyncssh.SSHClientConnection) -> None:
    """Stop ``conn`` sending the empty ``SSH_MSG_IGNORE`` asyncssh puts before every packet of the connection
    protocol once keys are set.

    That packet is a countermeasure for CBC-mode ciphers, whose next IV an observer knows; offload offers only
    AES-GCM, ChaCha20-Poly1305 and AES-CTR (``_CIPHERS`` in :mod:`offload.transports.ssh`), and OpenSSH's own
    client sends no such packet with them. Each one is a packet encrypted in the client's Python: half of the
    packets of an upload through a forward, where sshd takes at most 32 KiB per packet. Should a CBC cipher be
    in use all the same (a rekey is free to pick any offered one), they are sent as before."""
    send_packet = conn.send_packet

    def send(pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if pkttype == _MSG_IGNORE and args == (_EMPTY_STRING,):
            cipher = conn.get_extra_info("send_cipher") or "cbc"  # none yet: keep asyncssh's way
            if "cbc" not in cipher:
                return
        send_packet(pkttype, *args, **kwargs)

    conn.send_packet = send  # type: ignore[method-assign]  # asyncssh calls it as self.send_packet
