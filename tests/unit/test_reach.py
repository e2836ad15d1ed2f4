"""reach without a site: targets and their rewriting, and both ends of the relay talking over a real socket
(the node's relay and the client's mux in one process, the carrier replaced by a socket pair)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import socket
import subprocess
import sys

import pytest

from offload import ConfigError, JobSpec, reach_node
from offload.reach import _ClientMux
from offload.reach_targets import node_targets, parse_target, targets_of


def test_targets_and_what_the_payload_sees():
    web = parse_target("MLFLOW_TRACKING_URI", "http://user:pw@mlflow.example.org/api")
    assert (web.scheme, web.host, web.port) == ("http", "mlflow.example.org", 80)
    assert web.template() == f"http://user:pw@127.0.0.1:{reach_node.PORT_MARK}/api"
    secure = parse_target("S", "https://hub.example.org:8443/hub/api")
    assert (secure.hostport, secure.template()) == ("hub.example.org:8443", "https://hub.example.org:8443/hub/api")
    db = parse_target("DB", "postgresql://u@db.example.org:5432/x")
    assert db.template() == f"postgresql://u@127.0.0.1:{reach_node.PORT_MARK}/x"
    plain = parse_target("LIC", "license.example.org:27000")
    assert (plain.scheme, plain.template()) == ("tcp", f"127.0.0.1:{reach_node.PORT_MARK}")
    v6 = parse_target("V6", "http://[::1]:8080/")
    assert v6.hostport == "[::1]:8080"


@pytest.mark.parametrize(
    ("value", "message"),
    [("postgresql://db/x", "give the port"), ("nonsense", "neither a URL"), ("http://h:99999/", "port"),
     ("", "must be a URL")],
)  # fmt: skip
def test_bad_targets_say_why(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_target("X", value)


def test_jobspec_checks_reach_names_and_overlaps():
    with pytest.raises(ConfigError, match="both as env and as reach"):
        JobSpec(["true"], env={"A": "1"}, reach={"A": "http://h:1"})
    with pytest.raises(ConfigError, match="not a valid environment variable"):
        JobSpec(["true"], reach={"A B": "http://h:1"})
    assert JobSpec(["true"], reach={"A": "http://h:1"}) != JobSpec(["true"], reach={"A": "http://h:2"})


def test_the_local_site_gives_the_payload_the_value_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLOAD_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    import offload

    site = offload.load_site("local")
    job = site.submit(JobSpec([sys.executable, "-c", "import os; print(os.environ['SVC'])"],
                              reach={"SVC": "http://127.0.0.1:9/x"}))  # fmt: skip
    assert job.wait(timeout=60).state is offload.JobState.COMPLETED
    assert job.tail().strip() == "http://127.0.0.1:9/x"
    assert "http://127.0.0.1:9/x" not in site.job_script(JobSpec(["true"], reach={"SVC": "http://127.0.0.1:9/x"}))


async def echo_server() -> tuple[asyncio.AbstractServer, int]:
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_both_ends_relay_bytes_and_a_connection_without_carrier_is_closed(monkeypatch):
    monkeypatch.setattr(reach_node, "CARRIER_WAIT", 0.5)
    server, port = await echo_server()
    targets = targets_of({"ECHO": f"127.0.0.1:{port}", "GONE": "127.0.0.1:9"})
    relay, exports = await reach_node.start(json.loads(node_targets(targets)), f"unit-{os.getpid()}")
    env = dict(line.split(" ", 1)[1].split("=", 1) for line in exports)
    relayed = int(shlex.split(env["ECHO"])[0].rsplit(":", 1)[1])

    # no carrier attached: the connection is closed after a short wait, not held
    reader, writer = await asyncio.open_connection("127.0.0.1", relayed)
    assert await asyncio.wait_for(reader.read(10), 5) == b""
    writer.close()

    # attach a carrier: the client's mux on one end of a socket pair, the relay's on the other
    mine, theirs = socket.socketpair(socket.AF_UNIX)
    node_reader, node_writer = await asyncio.open_unix_connection(sock=theirs)
    carrier = asyncio.ensure_future(relay.on_carrier(node_reader, node_writer))
    client_reader, client_writer = await asyncio.open_unix_connection(sock=mine)
    kind, _, hello = await reach_node.read_frame(client_reader)
    assert kind == reach_node.HELLO and json.loads(hello)["version"] == 1
    stats: dict[str, int] = {}
    mux = _ClientMux(client_writer, [(t.host, t.port) for t in targets], stats)
    running = asyncio.ensure_future(mux.run(client_reader))

    reader, writer = await asyncio.open_connection("127.0.0.1", relayed)
    payload = os.urandom(3 * reach_node.WINDOW + 12345)  # more than the credit: flow control must work
    writer.write(payload)
    await writer.drain()
    received = b""
    while len(received) < len(payload):
        received += await asyncio.wait_for(reader.read(1 << 20), 10)
    assert received == payload
    writer.close()

    # a target the client cannot reach: the payload's connection is closed with nothing sent
    gone = int(shlex.split(env["GONE"])[0].rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", gone)
    assert await asyncio.wait_for(reader.read(10), 10) == b""
    assert stats["connections"] == 1

    client_writer.close()
    await asyncio.wait_for(carrier, 5)
    running.cancel()
    for s in relay.servers:
        s.close()
    server.close()


def test_the_node_program_runs_on_its_own(tmp_path):
    """It is sent as ``python3 -c``: it must not import offload."""
    from offload.reach import SOURCE

    result = subprocess.run([sys.executable, "-I", "-c", SOURCE, "bogus", "k"], capture_output=True, text=True,
                            timeout=30, cwd=tmp_path)  # fmt: skip
    assert "unknown mode 'bogus'" in result.stderr


def test_the_node_program_is_python_3_6():
    """Nodes may run an old Python (RHEL 8's is 3.6): its grammar, and none of the newer asyncio names."""
    import ast
    import re

    from offload.reach import SOURCE

    ast.parse(SOURCE, feature_version=(3, 6))
    assert "asyncio.run(" not in SOURCE and "get_running_loop" not in SOURCE
    assert not re.search(r"except \(?TimeoutError", SOURCE)  # builtin TimeoutError is asyncio's only from 3.11


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to listen as another user")
def test_the_carrier_refuses_a_relay_socket_another_user_holds(tmp_path):
    """The socket's abstract name derives from the job directory (squeue shows it to everyone): a co-tenant of
    the node who listens there first must not receive the job's traffic. The carrier checks who listens."""
    import subprocess
    import sys

    key = f"squat-{os.getpid()}"
    squatter = subprocess.Popen([sys.executable, "-c", (
        "import os, socket, sys, time\n"
        "os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.bind('\\0offload-reach-' + sys.argv[1]); s.listen()\n"
        "print('listening', flush=True); time.sleep(60)"), key],
        stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert squatter.stdout.readline().strip() == "listening"
        carried = subprocess.run([sys.executable, "-c", "import sys; from offload import reach_node; "
                                  "reach_node.main(['carry', sys.argv[1]])", key],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert carried.returncode == 1
        assert "held by uid 65534, not by this job's user" in carried.stderr
    finally:
        squatter.kill()
        squatter.wait()
