"""Port forwards over the site's one SSH connection: bytes both ways with half-close, a port that outlives a
dropped connection, and a far end that refuses without tripping up TLS clients."""

import hashlib
import os
import socket
import ssl
import threading

import pytest

import offload
from offload import _loop

from .conftest import wait_until


def serve(handler) -> int:
    """A TCP server on the login node (the test site's sshd is on this machine), one thread per connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def digest_then_answer(conn: socket.socket) -> None:
    """Read until the client's EOF, then answer with the digest and 8 MiB of the bytes' own hash chain."""
    with conn:
        h = hashlib.sha256()
        while chunk := conn.recv(1 << 16):
            h.update(chunk)
        conn.sendall(h.hexdigest().encode() + b"\n")
        block = h.digest()
        for _ in range(8 << 10):
            block = hashlib.sha256(block).digest()
            conn.sendall(block * 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_forward_carries_both_ways_and_keeps_a_half_closed_connection(site):
    forward = site.forward("127.0.0.1", serve(digest_then_answer))
    port = forward.local_port
    try:
        sent = os.urandom(48 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(sent)
            s.shutdown(socket.SHUT_WR)  # our half closes; the answer must still come back
            answer = bytearray()
            while chunk := s.recv(1 << 16):
                answer += chunk
        head, _, tail = bytes(answer).partition(b"\n")
        assert head.decode() == hashlib.sha256(sent).hexdigest()
        block = hashlib.sha256(sent).digest()
        expected = bytearray()
        for _ in range(8 << 10):
            block = hashlib.sha256(block).digest()
            expected += block * 32
        assert tail == bytes(expected)
    finally:
        forward.close()
    with pytest.raises(offload.TransportError, match="closed"):
        _ = forward.local_port
    with pytest.raises(ConnectionRefusedError):  # the port no longer listens
        socket.create_connection(("127.0.0.1", port), timeout=5)


def echo(conn: socket.socket) -> None:
    with conn:
        while chunk := conn.recv(1 << 16):
            conn.sendall(chunk)


def test_a_forwards_port_outlives_a_dropped_connection(site):
    forward = site.forward("127.0.0.1", serve(echo))
    port = forward.local_port
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"before")
            assert s.recv(100) == b"before"
        connects = site.transport.stats["connects"]
        _loop.run(_abort(site.transport))  # the network drops under us
        # the same port answers again, on the connection offload makes anew (nothing listened elsewhere meanwhile)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"after")
            assert s.recv(100) == b"after"
        assert forward.local_port == port
        assert site.transport.stats["connects"] == connects + 1
    finally:
        forward.close()


async def _abort(transport):
    conn = await transport._connection()
    conn.abort()


def test_a_refused_far_end_waits_for_the_client_to_speak_so_tls_clients_see_a_failed_handshake(site):
    forward = site.forward("127.0.0.1", free_port())  # nothing listens there
    try:
        with socket.create_connection(("127.0.0.1", forward.local_port), timeout=10) as s:
            s.settimeout(0.3)
            with pytest.raises(TimeoutError):  # not closed under a client that has not spoken yet
                s.recv(1)
            s.settimeout(10)
            s.sendall(b"hello")
            assert s.recv(1) == b""  # then closed
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", forward.local_port), timeout=10) as raw:
                with pytest.raises(OSError):  # ssl.SSLError and ConnectionResetError are OSErrors
                    context.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        forward.close()


def greet_and_close(conn: socket.socket) -> None:
    with conn:
        conn.sendall(b"bye\n")


def test_a_connection_whose_far_end_ends_first_is_released_when_the_client_ends(site):
    forward = site.forward("127.0.0.1", serve(greet_and_close))
    try:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", forward.local_port), timeout=30) as s:
                answer = b""
                while chunk := s.recv(100):
                    answer += chunk
                assert answer == b"bye\n"
                s.shutdown(socket.SHUT_WR)
        # both halves ended: offload holds neither the local socket nor the channel any more
        wait_until(lambda: not forward._inner.connections, timeout=10, what="the connections to be released")
    finally:
        forward.close()
