"""One site's settings (:class:`SiteConfig`) and the check of each value a profile may give.

Profiles are read from their file by :mod:`offload.profiles`, which also asks the plugins what they accept;
this module knows no plugin, so schedulers, runtimes and transports can import :class:`SiteConfig`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import platformdirs

from offload.errors import ConfigError
from offload.spec import ENV_NAME, parse_memory

LOCAL_SITE = "local"


@dataclass(frozen=True)
class SiteConfig:
    """One validated site profile. Field names are the TOML keys."""

    name: str
    # how to reach the site
    transport: str = "ssh"
    host: str | None = None
    port: int | None = None
    user: str | None = None
    identity_files: tuple[str, ...] = ()
    # Key material held in memory rather than in files (e.g. from an Airflow connection): an OpenSSH private
    # key, and known_hosts lines for the site. Never shown (repr) nor written anywhere by offload.
    private_key: str | None = field(default=None, repr=False)
    host_keys: str | None = field(default=None, repr=False)
    agent: bool = True
    jump_host: str | None = None
    known_hosts: str | None = None
    ssh_config: tuple[str, ...] = ()
    keepalive: int = 30
    max_sessions: int = 8
    connect_timeout: float = 20.0
    command_timeout: float = 45.0  # seconds any command on the site may take (status, cancel, ...)
    # the scheduler and its defaults
    scheduler: str = "slurm"
    partition: str | None = None
    gpu_partition: str | None = None
    account: str | None = None
    qos: str | None = None
    walltime: str | None = None
    gpus_per_node: int | None = None
    scheduler_options: tuple[str, ...] = ()
    poll_interval: float = 2.0
    # the container runtime
    runtime: str = "apptainer"
    runtime_options: tuple[str, ...] = ()
    image: str | None = None
    pull: str = "login"  # who pulls docker:// images: "login" (once, into the site's cache) or "node" (each job)
    # the job's surroundings
    shebang: str = "#!/bin/bash"  # e.g. "#!/bin/bash -l" where `module` needs a login shell
    workdir: str = "~/offload"
    setup: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    # keys the site's scheduler plugin declares (its ``profile_keys``), e.g. Grid Engine's parallel_environment
    scheduler_keys: dict[str, Any] = field(default_factory=dict)
    # where the profile came from, for error messages
    source: str = "<built-in>"

    def with_overrides(self, **changes: Any) -> SiteConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(SiteConfig) if f.name not in ("name", "source", "scheduler_keys")}
CHOICES = {
    "transport": ("ssh", "local"),
    "pull": ("login", "node"),
}


def default_config_path() -> Path:
    env = os.environ.get("OFFLOAD_CONFIG")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_config_dir("offload")) / "sites.toml"


def local_site_config() -> SiteConfig:
    """The built-in ``local`` site: local processes, no container, no scheduler daemon."""
    return SiteConfig(
        name=LOCAL_SITE,
        transport="local",
        scheduler="local",
        runtime="none",
        workdir=str(Path(platformdirs.user_data_dir("offload")) / "local-site"),
        poll_interval=0.5,
    )


def check_value(where: str, key: str, value: Any) -> Any:
    """One profile value checked against its field's type (``where`` names its origin in errors); lists become
    tuples so profiles stay hashable."""
    annotation = str(FIELDS[key].type)
    label = f"{where}: key {key!r}"
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{label} must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if annotation.startswith("tuple"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{label} must be a list of strings, got {value!r}")
        return tuple(value)
    if annotation.startswith("dict"):
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{label} must be a table of string values, got {value!r}")
        for env_name in value:
            if not ENV_NAME.match(env_name):
                raise ConfigError(f"{label}: {env_name!r} is not an environment variable name")
            if env_name.upper().startswith("OFFLOAD_"):
                raise ConfigError(f"{label}: {env_name!r}: names starting with OFFLOAD_ are offload's own")
        return dict(value)
    if annotation.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false, got {value!r}")
        return value
    if annotation.startswith("int"):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{label} must be a whole number, got {value!r}")
        return value
    if annotation.startswith("float"):
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ConfigError(f"{label} must be a number, got {value!r}")
        return float(value)
    # str or str | None
    if key == "walltime" and isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{label} must be a string, got {value!r}")
    if key == "memory":
        parse_memory(value)
    return value
