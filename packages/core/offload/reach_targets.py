"""What a job reaches (``JobSpec.reach``): each target parsed and checked, and what the node and a client are told.

Pure data, below :mod:`offload.spec` (which checks a job's targets when it is made) and :mod:`offload.reach`
(which serves them): parsing a URL needs no connection, no job and no site.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass

from offload import reach_node
from offload.errors import ConfigError

DEFAULT_PORTS = {"http": 80, "https": 443}
# Environment the relay sets for the payload beside the targets' own names (the CONNECT proxy for https).
PROXY_NAMES = ("https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY")
_HOSTPORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class ReachTarget:
    """One service a job reaches: the variable the payload reads, the value given, and where it points."""

    name: str
    value: str
    scheme: str
    host: str
    port: int

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def template(self) -> str:
        """The value on the node, with the relay's loopback port still to fill in (https stays as it is)."""
        if self.scheme == "https":
            return self.value
        if self.scheme == "tcp":
            return f"127.0.0.1:{reach_node.PORT_MARK}"
        parts = urllib.parse.urlsplit(self.value)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + f"127.0.0.1:{reach_node.PORT_MARK}"
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def for_node(self) -> dict[str, object]:
        return {"name": self.name, "value": self.value, "scheme": self.scheme, "hostport": self.hostport,
                "template": self.template()}  # fmt: skip


def parse_target(name: str, value: str) -> ReachTarget:
    """A target from ``NAME`` and a URL (``http[s]://host[:port]/...``, ``scheme://host:port``) or ``host:port``."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"reach[{name!r}] must be a URL or host:port, got {value!r}")
    value = value.strip()
    match = _HOSTPORT.match(value)
    if match:
        return ReachTarget(name, value, "tcp", match["host"].strip("[]"), _port(name, match["port"]))
    parts = urllib.parse.urlsplit(value)
    if not parts.scheme or not parts.netloc:
        raise ConfigError(
            f"reach[{name!r}] = {value!r} is neither a URL (http://host:port/...) nor host:port: offload needs to "
            "know where to relay the job's connections"
        )
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"reach[{name!r}] = {value!r}: the port is not a number") from None
    port = port or DEFAULT_PORTS.get(scheme)
    if port is None:
        raise ConfigError(f"reach[{name!r}] = {value!r}: give the port (e.g. {scheme}://host:5432)")
    if not parts.hostname:
        raise ConfigError(f"reach[{name!r}] = {value!r} has no host name")
    return ReachTarget(name, value, "https" if scheme == "https" else ("http" if scheme == "http" else "url"),
                       parts.hostname, port)  # fmt: skip


def _port(name: str, text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise ConfigError(f"reach[{name!r}]: {port} is not a TCP port")
    return port


def targets_of(reach: dict[str, str]) -> list[ReachTarget]:
    return [parse_target(name, value) for name, value in reach.items()]


def node_targets(targets: list[ReachTarget]) -> str:
    """What the job's relay is told (travels as a secret: URLs may carry credentials)."""
    return json.dumps([t.for_node() for t in targets], separators=(",", ":"))


def client_targets(targets: list[ReachTarget]) -> bytes:
    """What any client needs to serve the relay later (``reach.json`` in the job's directory): no credentials."""
    return json.dumps([{"name": t.name, "host": t.host, "port": t.port} for t in targets]).encode()
