"""The node side of ``reach``, and the framing both sides speak. Standard library only.

It is sent to compute nodes as a ``python3 -c`` program (Python 3.6 or newer: the oldest a site's nodes may
have), so it imports nothing from offload; the client imports its framing (:class:`Mux`) from here, so both
ends share one implementation. Two modes on the node:

``serve KEY PID``  (started by the batch script before the payload; JSON targets on stdin)
    Listens on the node's loopback: one port per ``http://`` or plain TCP target, and one HTTP CONNECT proxy
    port for ``https://`` targets (so TLS stays end to end, with the real host name for SNI and certificate
    checks). Prints the ``export NAME=...`` lines the payload gets (URLs rewritten to those ports;
    ``https_proxy`` for https), then ``offload-reach-ready``, then carries every connection over the one
    *carrier* attached to the abstract unix socket ``@offload-reach-KEY``. A connection made while no carrier
    is attached waits a little for one, then is closed: the job sees a refused request, not a hang. It ends
    with the batch script (process PID).

``carry KEY``  (a job step the client starts over SSH: ``srun --overlap ... python3 -c SRC carry KEY``)
    Connects to that socket and copies bytes between it and its stdin/stdout, which the scheduler carries to
    the client over its own step I/O. So nothing connects from the node to the login node or to the user,
    beyond what Slurm itself uses.

Only processes of the job's own user may use the relay: the carrier socket checks ``SO_PEERCRED``, and each
loopback connection is matched to its owner's uid in ``/proc/net/tcp``.

Frames, both ways: ``type (1 byte) | stream (4) | length (4) | payload``. The node OPENs a stream for a
target; the client answers OPENED, or CLOSE with the reason; DATA flows both ways with per-stream credit (an
ACK once the bytes were written on), EOF half-closes, CLOSE ends a stream. HELLO starts a carrier session.
The client may OPEN too, but only a port on the node's own loopback (``Site.forward_job``): so a service of
the job can listen on 127.0.0.1 alone, out of reach of everyone else on a shared node.
"""

import asyncio
import contextlib
import json
import os
import socket
import struct
import sys

HELLO, OPEN, OPENED, DATA, ACK, EOF, CLOSE = range(1, 8)
HEADER = struct.Struct("!BII")
WINDOW = 1 << 20  # bytes a side may send on one stream before the other side acknowledged them
CHUNK = 1 << 16
CARRIER_WAIT = 10.0  # seconds a new connection waits for a carrier before it is closed
READY = "offload-reach-ready"
PORT_MARK = "@OFFLOAD_PORT@"


def frame(kind, stream, payload=b""):
    return HEADER.pack(kind, stream, len(payload)) + payload


async def read_frame(reader):
    head = await reader.readexactly(HEADER.size)
    kind, stream, length = HEADER.unpack(head)
    payload = await reader.readexactly(length) if length else b""
    return kind, stream, payload


class Stream:
    """One relayed connection: a local socket on this side, frames to the other side."""

    def __init__(self, mux, sid, reader, writer):
        self.mux = mux
        self.sid = sid
        self.reader = reader
        self.writer = writer
        self.opened = asyncio.Event()
        self.closed = False
        self.reason = ""
        self.credit = WINDOW
        self.credit_event = asyncio.Event()
        self.credit_event.set()
        self.incoming = asyncio.Queue()
        self.tasks = []

    def start(self):
        self.tasks = [asyncio.ensure_future(self.pump_out()), asyncio.ensure_future(self.pump_in())]

    async def pump_out(self):
        """Local socket -> frames, within the credit the other side gave."""
        try:
            while not self.closed:
                data = await self.reader.read(CHUNK)
                if not data:
                    self.mux.send(frame(EOF, self.sid))
                    return
                while self.credit < len(data) and not self.closed:
                    self.credit_event.clear()
                    await self.credit_event.wait()
                if self.closed:
                    return
                self.credit -= len(data)
                await self.mux.send_data(frame(DATA, self.sid, data))
        except (ConnectionError, OSError):
            self.abort("the connection on this side failed")

    async def pump_in(self):
        """Frames -> local socket; each chunk acknowledged once written, so the sender may send more."""
        try:
            while True:
                item = await self.incoming.get()
                if item is None:
                    return
                if item is EOF:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    continue
                self.writer.write(item)
                await self.writer.drain()
                self.mux.send(frame(ACK, self.sid, struct.pack("!I", len(item))))
        except (ConnectionError, OSError, RuntimeError):
            self.abort("the connection on this side failed")

    def abort(self, reason):
        if not self.closed:
            self.mux.send(frame(CLOSE, self.sid, reason.encode()))
        self.close(reason)

    def close(self, reason=""):
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.credit_event.set()
        self.opened.set()
        self.incoming.put_nowait(None)
        with contextlib.suppress(Exception):
            self.writer.close()
        self.mux.streams.pop(self.sid, None)


class Mux:
    """Many streams over one carrier. Either side may open streams (the node: odd ids, the client: even ids);
    subclasses say what an OPEN from the other side means here."""

    def __init__(self, writer, first_sid):
        self.writer = writer
        self.streams = {}
        self.opening = set()
        self.next_sid = first_sid

    async def open(self, payload, reader, writer):
        """Open a stream to what ``payload`` names on the other side; the stream once it is open, else None."""
        sid = self.next_sid
        self.next_sid += 2
        stream = self.streams[sid] = Stream(self, sid, reader, writer)
        self.send(frame(OPEN, sid, payload))
        await stream.opened.wait()
        return None if stream.closed else stream

    def send(self, data):
        with contextlib.suppress(Exception):
            self.writer.write(data)

    async def send_data(self, data):
        self.writer.write(data)
        await self.writer.drain()

    async def on_open(self, sid, payload):
        self.send(frame(CLOSE, sid, b"this side opens no streams"))

    async def run(self, reader):
        """Dispatch frames until the carrier ends; then every stream it carried ends too."""
        try:
            while True:
                kind, sid, payload = await read_frame(reader)
                if kind == OPEN:
                    task = asyncio.ensure_future(self.on_open(sid, payload))
                    self.opening.add(task)
                    task.add_done_callback(self.opening.discard)
                    continue
                stream = self.streams.get(sid)
                if stream is None:
                    continue
                if kind == OPENED:
                    stream.opened.set()
                elif kind == DATA:
                    stream.incoming.put_nowait(payload)
                elif kind == ACK:
                    stream.credit += struct.unpack("!I", payload)[0]
                    stream.credit_event.set()
                elif kind == EOF:
                    stream.incoming.put_nowait(EOF)
                elif kind == CLOSE:
                    stream.close(payload.decode("utf-8", "replace") or "closed by the other side")
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self.close_all("the carrier ended")

    def close_all(self, reason):
        for stream in list(self.streams.values()):
            stream.close(reason)


# -- the node side ---------------------------------------------------------------------------------------


def quote(value):
    return "'" + value.replace("'", "'\"'\"'") + "'"


def owner_uid(local_port, peer_port):
    """The uid owning the loopback socket connected from ``peer_port`` to our ``local_port`` (None: unknown)."""
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(f":{peer_port:04X}") and fields[2].endswith(f":{local_port:04X}"):
                        return int(fields[7])
        except (OSError, StopIteration, ValueError, IndexError):
            continue
    return None


class NodeMux(Mux):
    """The node's end of a carrier: the client may open streams to ports on this node's loopback (a service
    of the job that listens only there, e.g. a Dask dashboard), and to nothing else."""

    def __init__(self, writer):
        super().__init__(writer, 1)

    async def on_open(self, sid, payload):
        if len(payload) != 3 or payload[:1] != b"L":
            self.send(frame(CLOSE, sid, b"the node opens only loopback ports"))
            return
        port = struct.unpack("!H", payload[1:])[0]
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 15)
        except (asyncio.TimeoutError, OSError) as exc:
            self.send(frame(CLOSE, sid, f"nothing answers on the node's 127.0.0.1:{port}: {exc}".encode()))
            return
        stream = self.streams[sid] = Stream(self, sid, reader, writer)
        self.send(frame(OPENED, sid))
        stream.start()


def loopback(port):
    """What a client's OPEN asks the node for: its own 127.0.0.1:``port``."""
    return b"L" + struct.pack("!H", port)


def peer_uid(sock):
    """The uid of the process at the other end of a unix socket (for a client: the one that listens), -1 if
    unknown: the kernel's SO_PEERCRED, which the peer cannot forge."""
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return -1
    return struct.unpack("3i", creds)[1]


class NodeRelay:
    def __init__(self, targets):
        self.targets = targets
        self.mux = None
        self.servers = []
        self.carrier_ready = asyncio.Event()
        self.uid = os.getuid()

    async def on_carrier(self, reader, writer):
        if peer_uid(writer.get_extra_info("socket")) != self.uid:
            writer.close()
            return
        if self.mux is not None:  # a new carrier replaces the old one (the client reconnected)
            self.mux.writer.close()
            self.mux.close_all("replaced by a new carrier")
        mux = self.mux = NodeMux(writer)
        mux.send(frame(HELLO, 0, json.dumps({"node": socket.gethostname(), "version": 1}).encode()))
        self.carrier_ready.set()
        try:
            await mux.run(reader)
        finally:
            if self.mux is mux:
                self.mux = None
                self.carrier_ready.clear()
            writer.close()

    def allowed(self, writer):
        local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
        return bool(local and peer) and owner_uid(local[1], peer[1]) == self.uid

    async def connect(self, index, reader, writer):
        """A stream to target ``index`` once the client reached it; None if it could not."""
        if self.mux is None:
            try:
                await asyncio.wait_for(self.carrier_ready.wait(), CARRIER_WAIT)
            except asyncio.TimeoutError:
                return None
        mux = self.mux
        if mux is None:
            return None
        return await mux.open(struct.pack("!H", index), reader, writer)

    async def on_direct(self, index, reader, writer):
        if not self.allowed(writer):
            writer.close()
            return
        stream = await self.connect(index, reader, writer)
        if stream is None:
            writer.close()
            return
        stream.start()

    async def on_proxy(self, reader, writer):
        """An HTTP CONNECT proxy that tunnels only to the job's https targets."""
        if not self.allowed(writer):
            writer.close()
            return
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            writer.close()
            return
        words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        wanted = words[1].lower() if len(words) >= 2 and words[0].upper() == "CONNECT" else None
        index = None
        for i, target in enumerate(self.targets):
            if target["scheme"] == "https" and target["hostport"].lower() == wanted:
                index = i
        if index is None:
            text = f"offload's reach relay tunnels only the job's https targets, not {wanted}\n".encode()
            writer.write(f"HTTP/1.1 403 Forbidden\r\nContent-Length: {len(text)}\r\n\r\n".encode() + text)
            writer.close()
            return
        stream = await self.connect(index, reader, writer)
        if stream is None:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        stream.start()


async def start(targets, key):
    """Listen for the payload and for the carrier; returns the relay and the payload's ``export`` lines."""
    relay = NodeRelay(targets)
    exports = []
    if any(t["scheme"] == "https" for t in targets):
        server = await asyncio.start_server(relay.on_proxy, "127.0.0.1", 0)
        relay.servers.append(server)
        proxy = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        exports += [f"export {name}={quote(proxy)}" for name in ("https_proxy", "HTTPS_PROXY")]
    for index, target in enumerate(targets):
        value = target["value"]
        if target["scheme"] != "https":

            def handler(reader, writer, index=index):
                return relay.on_direct(index, reader, writer)

            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            relay.servers.append(server)
            value = target["template"].replace(PORT_MARK, str(server.sockets[0].getsockname()[1]))
        exports.append(f"export {target['name']}={quote(value)}")
    # Loopback bypasses the proxy, unless an https target itself is on the client's loopback.
    tunnelled = {t["hostport"].rpartition(":")[0].strip("[]").lower() for t in targets if t["scheme"] == "https"}
    local = [name for name in ("127.0.0.1", "localhost") if name not in tunnelled]
    no_proxy = ",".join(x for x in [os.environ.get("no_proxy", ""), *local] if x)
    exports += [f"export {name}={quote(no_proxy)}" for name in ("no_proxy", "NO_PROXY")]
    relay.servers.append(await asyncio.start_unix_server(relay.on_carrier, "\0offload-reach-" + key))
    return relay, exports


async def serve(key, parent):
    targets = json.loads(sys.stdin.readline())
    _relay, exports = await start(targets, key)
    sys.stdout.write("\n".join(exports) + "\n" + READY + "\n")
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the batch script stops reading after READY
    while True:  # end with the batch script, even one killed without a word
        try:
            os.kill(parent, 0)
        except ProcessLookupError:
            return
        except PermissionError:
            pass
        await asyncio.sleep(1)


async def carry(key):
    """Copy bytes between the relay's socket and stdin/stdout (which the scheduler's step I/O carries)."""
    loop = asyncio.get_event_loop()
    for attempt in range(60):  # the job may have started a moment ago: its relay may not listen yet
        try:
            reader, writer = await asyncio.open_unix_connection("\0offload-reach-" + key)
            break
        except OSError:
            if attempt == 59:
                raise
            await asyncio.sleep(0.5)
    listener = peer_uid(writer.get_extra_info("socket"))
    if listener != os.getuid():
        # The abstract name derives from the job directory, which squeue shows every user: a co-tenant of the node
        # could listen there first and read the job's traffic. Only a listener of the job's own user is carried.
        writer.close()
        sys.exit(
            f"offload reach: the relay socket @offload-reach-{key} is held by uid {listener}, not by this job's "
            "user: refusing to carry the job's connections there"
        )
    stdin = asyncio.StreamReader(limit=1 << 22)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    stdout = asyncio.StreamWriter(transport, protocol, None, loop)

    async def copy(source, sink):
        while True:
            data = await source.read(CHUNK)
            if not data:
                return
            sink.write(data)
            await sink.drain()

    tasks = [asyncio.ensure_future(copy(stdin, writer)), asyncio.ensure_future(copy(reader, stdout))]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    writer.close()


def main(argv):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if argv[0] == "serve":
        loop.run_until_complete(serve(argv[1], int(argv[2])))
    elif argv[0] == "carry":
        loop.run_until_complete(carry(argv[1]))
    else:
        sys.exit(f"unknown mode {argv[0]!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
