"""``OffloadHook``: an offload :class:`~offload.Site` from an Airflow connection or a named site profile.

A connection is data an Airflow user can edit, so it must not be a way to run code on the worker: only
offload's own profile keys that name no local file or program are taken from its extras (no ``ssh_config``
with a ``ProxyCommand``, no ``known_hosts`` or ``identity_files`` paths, no ``transport = "local"``), the host key
must be one ``algorithm base64`` line, and key material stays in memory (``asyncssh.import_private_key``,
``import_known_hosts``), never in a file in a shared temporary directory.

Two connection types work: offload's own (``offload``), and Airflow's ``ssh`` as the SSH provider stores it
(host, login, port; ``private_key``, ``key_file``, ``host_key`` in extras), so a site already set up for
``SSHOperator`` works unchanged; name the site's profile (``site=``) for what SSH does not say (scheduler,
runtime, partitions).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any

import offload
from airflow_offload.version_compat import BaseHook

# Extras that are not site profile keys.
_KEY_FIELDS = ("private_key", "key_file", "host_key", "site", "private_key_passphrase")
# Profile keys a connection may not set: each names a file or a program on the worker.
_REFUSED = {
    "ssh_config": "it may hold a ProxyCommand, which would run on the worker",
    "known_hosts": "give the site's key itself in 'host_key'",
    "identity_files": "give the key itself in 'private_key' (or 'key_file')",
    "transport": "a connection always reaches its site over SSH",
    "private_key_passphrase": "use a key without a passphrase in the connection",
}
# What Airflow's SSH provider keeps in its extras that means nothing here (accepted, not used).
_SSH_PROVIDER_EXTRAS = {"timeout", "conn_timeout", "cmd_timeout", "compress", "no_host_key_check",
                        "allow_host_key_change", "look_for_keys", "disabled_algorithms", "ciphers"}  # fmt: skip
_HOST_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp(256|384|521)|sk-\S+) [A-Za-z0-9+/]+={0,3}$")


class OffloadHook(BaseHook):
    """Reach an HPC site. Either ``offload_conn_id`` (an Airflow connection of type ``offload`` or ``ssh``:
    host, port, login, and in its fields or extra a private key or key file, the site's host key and any site
    profile key) or ``site`` (a profile of the offload config file), or both (the profile, with the
    connection's credentials). Neither: ``$OFFLOAD_SITE``, the config's default, else the ``local`` site. A
    ``site`` without a connection may name several profiles (``"a,b"``, ``"@group"``): each task's job goes
    where it starts first.

    Sites are shared per process (``offload.shared_site``), so the tasks and triggers of one process reuse one SSH
    connection, closed when the process exits.
    """

    conn_name_attr = "offload_conn_id"
    default_conn_name = "offload_default"
    conn_type = "offload"
    hook_name = "offload (HPC site over SSH)"

    def __init__(self, offload_conn_id: str | None = None, site: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offload_conn_id = offload_conn_id
        self.site_name = site

    def get_site(self, spec: offload.JobSpec | None = None) -> offload.Site:
        """The site. A profile ``site`` naming several (``"a,b"``, ``"@group"``): given ``spec``, the one where it
        starts first (``offload.choose_site``), else the first of them."""
        if self.offload_conn_id is None:
            if spec is not None:
                return offload.choose_site(self.site_name, spec)
            return self.get_sites()[0]
        connection = self.get_connection(self.offload_conn_id)
        return offload.shared_site(site_config(self.offload_conn_id, connection, self.site_name))

    def get_sites(self) -> list[offload.Site]:
        """Every site this hook may use: each one a profile ``site`` names (several: ``"a,b"``, ``"@group"``),
        else the one site (where a task looks for the job an earlier try left)."""
        if self.offload_conn_id is None and self.site_name:
            return offload.load_sites(self.site_name).sites
        return [self.get_site()] if self.offload_conn_id is not None else [offload.load_site(None)]

    async def aget_site(self) -> offload.Site:
        """For triggers: reads the connection without blocking the triggerer's event loop."""
        if self.offload_conn_id is None:
            return offload.load_site(self.site_name)
        connection = await self.aget_connection(self.offload_conn_id)
        return offload.shared_site(site_config(self.offload_conn_id, connection, self.site_name))

    def test_connection(self) -> tuple[bool, str]:
        """The connection form's Test button: reach the site and run ``offload doctor``'s checks on it.

        Airflow shows the message as it is, so a failure says what offload says (the check, what it found, how
        to fix it) rather than a traceback, and nothing is raised. The checks only look (connection, host key,
        the scheduler's commands, runtime, default image, work directory, partitions): no job is submitted, so
        the compute-node network probe is left to ``offload doctor`` itself. A fresh site is used and closed,
        so a transient connection of the form leaves nothing behind in this process.
        """
        try:
            if self.offload_conn_id is None:
                config = offload.load_profiles().get(self.site_name)
            else:
                config = site_config(self.offload_conn_id, self.get_connection(self.offload_conn_id), self.site_name)
            checks = list(offload.run_checks(config, network=False))
        except Exception as exc:  # an unknown connection id, a bad profile, an unexpected error: all are messages
            return False, str(exc) or type(exc).__name__
        failed = [check for check in checks if check.outcome == "fail"]
        if failed:
            return False, "; ".join(
                f"{check.name}: {check.detail}" + (f" (fix: {check.fix})" if check.fix else "") for check in failed
            )
        reached = next((check.detail for check in checks if check.name == "connection"), config.name)
        passed = ", ".join(check.name for check in checks if check.outcome == "ok")
        return True, f"site {config.name} reached ({reached}); offload doctor's checks pass: {passed}"


def site_config(conn_id: str, connection: Any, site: str | None = None) -> offload.SiteConfig:
    """A site profile from an Airflow connection (``offload`` or ``ssh`` type); refuses what could run code."""
    where = f"Airflow connection {conn_id!r}"
    raw = connection.extra_dejson if isinstance(connection.extra_dejson, dict) else json.loads(connection.extra)
    fields = {k.removeprefix("extra__offload__").removeprefix("extra__ssh__"): v for k, v in raw.items()
              if v not in (None, "")}  # fmt: skip
    for key, why in _REFUSED.items():
        if key in fields:
            raise offload.ConfigError(f"{where}: the key {key!r} is not taken from a connection: {why}")
    if getattr(connection, "conn_type", "offload") == "ssh":
        fields = {k: v for k, v in fields.items() if k not in _SSH_PROVIDER_EXTRAS}
    base_name = fields.get("site") or site
    base = offload.load_profiles().get(base_name) if base_name else None
    table = {k: v for k, v in fields.items() if k not in _KEY_FIELDS}
    if connection.host:
        table["host"] = connection.host
    if connection.port:
        table["port"] = int(connection.port)
    if connection.login:
        table["user"] = connection.login
    if fields.get("private_key"):
        table["private_key"] = fields["private_key"].strip() + "\n"
    elif fields.get("key_file"):
        table["private_key"] = _read_key(where, fields["key_file"])
    if fields.get("host_key"):
        host = table.get("host") or (base.host if base else None)
        port = table.get("port") or (base.port if base else None)
        table["host_keys"] = _known_hosts(where, host, port, fields["host_key"])
    return offload.profile_from_table(base.name if base else f"airflow-{conn_id}", table, where, base)


def _known_hosts(where: str, host: str | None, port: int | None, value: str) -> str:
    """One ``known_hosts`` line for the connection's host, from one ``algorithm base64`` key: nothing else."""
    key = str(value).strip()
    if "\n" in key or "\r" in key or not _HOST_KEY.match(key):
        raise offload.ConfigError(
            f"{where}: host_key must be one line 'ALGORITHM BASE64', e.g. 'ssh-ed25519 AAAAC3Nza...' (from "
            "'ssh-keyscan HOST' or the site's documentation), without a host name, options or a second line"
        )
    try:
        base64.b64decode(key.split()[1], validate=True)
    except (binascii.Error, ValueError):
        raise offload.ConfigError(f"{where}: the host_key's key part is not base64") from None
    if not host:
        raise offload.ConfigError(f"{where}: a host_key needs the connection's host")
    pattern = f"[{host}]:{port}" if port and port != 22 else host
    return f"{pattern} {key}\n"


def _read_key(where: str, path: str) -> str:
    """A key file is read as a key and nothing else (never as configuration)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise offload.ConfigError(f"{where}: cannot read key_file {path!r} ({exc.strerror})") from None
    if "PRIVATE KEY" not in text:
        raise offload.ConfigError(f"{where}: key_file {path!r} holds no private key")
    return text
