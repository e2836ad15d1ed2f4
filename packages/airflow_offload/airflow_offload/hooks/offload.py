"""``OffloadHook``: an offload :class:`~offload.Site` from an Airflow connection or a named site profile."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import offload
from airflow_offload.version_compat import BaseHook
from offload.config import load_profiles, profile_from_table
from offload.records import write_private

# Connection fields that are not site profile keys.
_KEY_FIELDS = ("private_key", "key_file", "host_key", "site")
_sites: dict[str, offload.Site] = {}


class OffloadHook(BaseHook):
    """Reach an HPC site. Either ``offload_conn_id`` (an Airflow connection of type ``offload``: host, port,
    login, and in its fields or extra a private key or key file, the site's host key and any site profile key)
    or ``site`` (a profile of the offload config file). Neither: ``$OFFLOAD_SITE``, the config's default,
    else the ``local`` site.

    Sites are shared per process, so the tasks a worker runs reuse one SSH connection.
    """

    conn_name_attr = "offload_conn_id"
    default_conn_name = "offload_default"
    conn_type = "offload"
    hook_name = "offload (HPC site over SSH)"

    def __init__(self, offload_conn_id: str | None = None, site: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.offload_conn_id = offload_conn_id
        self.site_name = site

    def get_site(self) -> offload.Site:
        if self.offload_conn_id is None:
            return offload.load_site(self.site_name)
        return _cached(site_config(self.offload_conn_id, self.get_connection(self.offload_conn_id)))

    async def aget_site(self) -> offload.Site:
        """For triggers: reads the connection without blocking the triggerer's event loop."""
        if self.offload_conn_id is None:
            return offload.load_site(self.site_name)
        connection = await self.aget_connection(self.offload_conn_id)
        return _cached(site_config(self.offload_conn_id, connection))


def site_config(conn_id: str, connection: Any) -> offload.SiteConfig:
    """A site profile from an Airflow connection; key material goes to 0600 files in a 0700 directory."""
    extra = connection.extra_dejson if isinstance(connection.extra_dejson, dict) else json.loads(connection.extra)
    fields = {k.removeprefix("extra__offload__"): v for k, v in extra.items() if v not in (None, "")}
    base = load_profiles().get(fields["site"]) if fields.get("site") else None
    table = {k: v for k, v in fields.items() if k not in _KEY_FIELDS}
    if connection.host:
        table["host"] = connection.host
    if connection.port:
        table["port"] = int(connection.port)
    if connection.login:
        table["user"] = connection.login
    private = _private_dir(conn_id)
    if fields.get("private_key"):
        key = private / "id"
        write_private(key, fields["private_key"].strip() + "\n")
        table["identity_files"] = [str(key)]
    elif fields.get("key_file"):
        table["identity_files"] = [fields["key_file"]]
    if fields.get("host_key"):
        host = table.get("host") or (base.host if base else None)
        port = table.get("port") or (base.port if base else None)
        pattern = f"[{host}]:{port}" if port and port != 22 else host
        known = private / "known_hosts"
        write_private(known, f"{pattern} {fields['host_key'].strip()}\n")
        table["known_hosts"] = str(known)
    return profile_from_table(base.name if base else f"airflow-{conn_id}", table, f"Airflow connection {conn_id!r}",
                              base)  # fmt: skip


def _private_dir(conn_id: str) -> Path:
    path = Path(tempfile.gettempdir()) / f"offload-airflow-{os.getuid()}" / conn_id
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    os.chmod(path, 0o700)
    return path


def _cached(config: offload.SiteConfig) -> offload.Site:
    site = _sites.get(config.name)
    if site is None or site.config != config:
        site = _sites[config.name] = offload.Site(config)
    return site
