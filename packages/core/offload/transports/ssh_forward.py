"""A local port forward over the site's SSH connection, listened on by offload itself.

asyncssh's own listener belongs to one connection: it closes with it, and offload had to listen again on the
same port after a reconnect (another program could take the port meanwhile, and connections made during the
reconnect were refused). Here the port is an asyncio server of this process, and each connection opens an SSH
channel on whatever connection the transport holds *then*: the port outlives reconnects, and a connection made
while the link is down waits for it.

A connection whose channel cannot open (the far end refuses: a Dask scheduler that died, a JupyterLab that
ended) is closed only once its client has spoken, or after :data:`HOLD_REFUSED` seconds. A client that starts
TLS then sees a failed handshake, which it handles as a connection error; closed before its handshake, tornado
raises ``ValueError`` instead, which ``distributed.Client`` does not catch while it reconnects.

Bytes flow between asyncio's transport and asyncssh's channel with the back pressure of both: a side whose
write buffer fills pauses reading on the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import asyncssh

from offload.errors import TransportError

log = logging.getLogger("offload.ssh")

HOLD_REFUSED = 1.0
# Bytes a client may send before its channel is open (its first request, a TLS hello); beyond it, reading waits.
_EARLY_LIMIT = 1 << 20
# The largest data packet we let sshd send on a channel (asyncssh's default: 32 KiB). asyncssh's cost is per
# packet, so 8x fewer packets take a 200 MiB stream from 0.85-0.95x to 1.0x `ssh -L` (bench/transfer.py).
_MAX_PACKET = 256 << 10

Connect = Callable[[], Awaitable[asyncssh.SSHClientConnection]]


class _ChannelSide(asyncssh.SSHTCPSession[bytes]):
    """The SSH channel's end: what the far side sends goes to the local client."""

    def __init__(self, local: _LocalSide) -> None:
        self._local = local

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._local.write(data)

    def eof_received(self) -> bool:
        return self._local.far_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self._local.close()

    def pause_writing(self) -> None:
        self._local.pause_reading()

    def resume_writing(self) -> None:
        self._local.resume_reading()


class _LocalSide(asyncio.Protocol):
    """One accepted local connection and the channel that carries it."""

    def __init__(self, forward: SSHForward) -> None:
        self._forward = forward
        self._transport: asyncio.Transport | None = None
        self._channel: asyncssh.SSHTCPChannel[bytes] | None = None
        self._early = bytearray()
        self._local_eof = False
        self._far_eof = False
        self._refused = False
        self._opening: asyncio.Task[None] | None = None

    # -- the local client ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._forward.connections.add(self)
        self._opening = asyncio.get_running_loop().create_task(self._open())

    def data_received(self, data: bytes) -> None:
        if self._channel is not None:
            self._channel.write(data)
        elif self._refused:
            self.close()
        else:
            self._early += data
            if len(self._early) > _EARLY_LIMIT:
                self.pause_reading()

    def eof_received(self) -> bool:
        self._local_eof = True
        if self._channel is not None:
            self._channel.write_eof()
        elif self._refused:
            self.close()
        # Half-closed, the answer may still come; once both sides are done, returning False closes both.
        return not self._far_eof

    def pause_writing(self) -> None:
        if self._channel is not None:
            self._channel.pause_reading()

    def resume_writing(self) -> None:
        if self._channel is not None:
            self._channel.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        # A channel still opening is closed by _open once it opens (cancelling asyncssh mid-open could leak it).
        self._forward.connections.discard(self)
        if self._channel is not None:
            self._channel.close()

    # -- what the channel side calls ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def far_eof(self) -> bool:
        """The far side is done sending; keep the channel open until the client is done too."""
        self._far_eof = True
        if self._transport is not None and self._transport.can_write_eof() and not self._transport.is_closing():
            self._transport.write_eof()
        return not self._local_eof

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- opening the channel ------------------------------------------------------------------------------

    async def _open(self) -> None:
        forward = self._forward
        try:
            conn = await forward.connect()
            channel, _ = await conn.create_connection(
                lambda: _ChannelSide(self), forward.remote_host, forward.remote_port, max_pktsize=_MAX_PACKET
            )
        except (asyncssh.Error, TransportError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            log.debug("forward to %s:%s: no channel (%s)", forward.remote_host, forward.remote_port, reason)
            self._refused = True
            if self._early or self._local_eof:
                self.close()
            else:
                asyncio.get_running_loop().call_later(HOLD_REFUSED, self.close)
            return
        if self._transport is None or self._transport.is_closing():
            channel.close()
            return
        self._channel = channel
        if self._early:
            channel.write(bytes(self._early))
            self._early.clear()
            self.resume_reading()
        if self._local_eof:
            channel.write_eof()


class SSHForward:
    """127.0.0.1:``local_port`` carried to ``remote_host:remote_port`` as seen from the site's login node."""

    def __init__(self, connect: Connect, remote_host: str, remote_port: int, *, open_forwards: set[SSHForward]):
        self.connect = connect
        self.remote_host = remote_host
        self.remote_port = remote_port
        self.connections: set[_LocalSide] = set()
        self._server: asyncio.AbstractServer | None = None
        self._open_forwards = open_forwards  # the transport's: it reconnects at once after a drop while any is open

    async def listen(self, local_port: int = 0) -> None:
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _LocalSide(self), "127.0.0.1", local_port
            )
        except OSError as exc:
            raise TransportError(
                f"cannot listen on 127.0.0.1:{local_port} for a port forward: {exc.strerror}"
            ) from None
        self._open_forwards.add(self)

    @property
    def local_port(self) -> int:
        if self._server is None:
            raise TransportError(f"the forward to {self.remote_host}:{self.remote_port} is closed")
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop listening and end the connections it carries."""
        self._open_forwards.discard(self)
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for connection in list(self.connections):
            connection.close()
        with contextlib.suppress(Exception):
            await server.wait_closed()
