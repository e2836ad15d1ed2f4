"""Site profiles: one TOML file, validated on load, each site checked against the plugins that will run it.

The file is ``$OFFLOAD_CONFIG`` or ``<user config dir>/offload/sites.toml``::

    default_site = "leonardo"

    [sites.leonardo]
    host = "login.leonardo.cineca.it"   # or an alias of ~/.ssh/config
    user = "jdoe"
    scheduler = "slurm"
    partition = "boost_usr_prod"
    gpus_per_node = 4
    runtime = "apptainer"
    runtime_options = ["--nv"]
    setup = ["module load apptainer"]

Every error names the file, the site and the key, and suggests the nearest valid key for a typo. An
environment variable ``OFFLOAD__<SITE>__<KEY>`` overrides one key of one site (the value is read as TOML
when it parses, else as a string), so CI can point a profile elsewhere without editing the file.

This module sits above the plugins (it asks them which schedulers, runtimes and transports exist, and which
keys a scheduler adds); :mod:`offload.config` below them holds the settings and the checks of single values.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from offload.config import FIELDS, LOCAL_SITE, SiteConfig, check_value, default_config_path, local_site_config
from offload.errors import ConfigError, did_you_mean
from offload.plugins import plugins
from offload.spec import parse_walltime


@dataclass(frozen=True)
class SiteProfiles:
    """All profiles of one config file, plus the built-in ``local`` site."""

    path: Path
    sites: dict[str, SiteConfig]
    default_site: str | None
    # Sites whose section has a mistake: reported when that site is used, so the others keep working.
    errors: dict[str, ConfigError] = field(default_factory=dict)
    # Named lists of sites ([groups] gpu = ["leonardo", "juwels"]), used as "@gpu" wherever several sites may be
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def names(self, sites: str | Sequence[str]) -> list[str]:
        """The site names ``sites`` stands for: ``"a,b"``, ``"@group"``, a list of those, or one name; each
        checked (an unknown one raises with the known ones), in the order given, without repeats."""
        parts = [sites] if isinstance(sites, str) else list(sites)
        found: list[str] = []
        for part in (p.strip() for item in parts for p in str(item).split(",")):
            if not part:
                continue
            if part.startswith("@"):
                group = part[1:]
                if group not in self.groups:
                    named = [f"@{g}" for g in sorted(self.groups)]
                    raise ConfigError(
                        f"unknown group {part!r}{did_you_mean(part, named)}. Groups in {self.path}: "
                        f'{", ".join(named) or "none"}. Add one there: [groups] {group} = ["site", ...].'
                    )
                members = list(self.groups[group])
            else:
                self.get(part)  # an unknown site raises, naming the known ones
                members = [part]
            found += [m for m in members if m not in found]
        if not found:
            raise ConfigError("no site given: name one or more sites ('a,b') or a group ('@gpu')")
        return found

    def get(self, name: str | None) -> SiteConfig:
        """The profile called ``name``; None picks ``$OFFLOAD_SITE``, the file's default, else ``local``."""
        chosen = name or os.environ.get("OFFLOAD_SITE") or self.default_site or LOCAL_SITE
        if chosen in self.sites:
            return self.sites[chosen]
        if chosen in self.errors:
            raise self.errors[chosen]
        known = sorted([*self.sites, *self.errors])
        hint = did_you_mean(chosen, known)
        where = str(self.path) if self.path.exists() else f"{self.path} (which does not exist yet)"
        raise ConfigError(
            f"unknown site {chosen!r}{hint}. Sites in {where}: {', '.join(known)}. "
            f"Add a [sites.{chosen}] table there, or run 'offload sites list'."
        )


def load_profiles(path: str | os.PathLike[str] | None = None) -> SiteProfiles:
    """Read and validate the site profile file (a missing file leaves only the ``local`` site)."""
    file = Path(path).expanduser() if path is not None else default_config_path()
    sites: dict[str, SiteConfig] = {LOCAL_SITE: local_site_config()}
    data: dict[str, Any] = {}
    if file.exists():
        try:
            data = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML ({exc}). Fix the syntax and try again.") from None
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read it ({exc.strerror})") from None
    elif path is not None or os.environ.get("OFFLOAD_CONFIG"):
        raise ConfigError(f"{file}: no such file. Set OFFLOAD_CONFIG to an existing site profile file.")

    unknown_top = set(data) - {"default_site", "sites", "groups"}
    for key in sorted(unknown_top):
        raise ConfigError(
            f"{file}: unknown top-level key {key!r}{did_you_mean(key, ['default_site', 'sites', 'groups'])}. "
            "Site profiles go in [sites.NAME] tables, groups of sites in a [groups] table."
        )
    raw_sites = data.get("sites", {})
    if not isinstance(raw_sites, dict):
        raise ConfigError(f"{file}: 'sites' must be a table of [sites.NAME] tables")
    errors: dict[str, ConfigError] = {}
    for name, table in raw_sites.items():
        try:
            if not isinstance(table, dict):
                raise ConfigError(f"{file}: [sites.{name}] must be a table of keys")
            base = local_site_config() if name == LOCAL_SITE else SiteConfig(name=name)
            sites[name] = _validate_site(file, name, table, base, _env_overrides(name))
        except ConfigError as exc:
            sites.pop(name, None)
            errors[name] = exc
    for name in set(_env_sites()) - set(raw_sites):
        if name == LOCAL_SITE:
            try:
                sites[name] = _validate_site(file, name, {}, local_site_config(), _env_overrides(name))
            except ConfigError as exc:
                sites.pop(name, None)
                errors[name] = exc

    default = data.get("default_site")
    if default is not None and default not in sites and default not in errors:
        raise ConfigError(
            f"{file}: default_site = {default!r} names no site{did_you_mean(default, list(sites))}. "
            f"Sites: {', '.join(sorted(sites))}."
        )
    return SiteProfiles(path=file, sites=sites, default_site=default, errors=errors,
                        groups=_groups(file, data.get("groups", {}), [*sites, *errors]))  # fmt: skip


def _groups(file: Path, table: Any, known: list[str]) -> dict[str, tuple[str, ...]]:
    """``[groups] gpu = ["leonardo", "juwels"]``: each a non-empty list of sites of this file."""
    if not isinstance(table, dict):
        raise ConfigError(f'{file}: [groups] must be a table of lists of sites, e.g. gpu = ["leonardo", "juwels"]')
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in table.items():
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ConfigError(f'{file}: [groups] {name} must be a non-empty list of site names, e.g. ["a", "b"]')
        for member in members:
            if member not in known:
                raise ConfigError(f"{file}: [groups] {name} names no site {member!r}{did_you_mean(member, known)}. "
                                  f"Sites: {', '.join(sorted(known))}.")  # fmt: skip
        groups[name] = tuple(dict.fromkeys(members))
    return groups


def profile_from_table(name: str, table: dict[str, Any], source: str, base: SiteConfig | None = None) -> SiteConfig:
    """A validated profile from keys given elsewhere than the file (e.g. an Airflow connection's fields);
    errors name ``source`` where they would name the file."""
    start = base or (local_site_config() if name == LOCAL_SITE else SiteConfig(name=name))
    return _validate_site(Path(source), name, dict(table), start)


def _env_sites() -> list[str]:
    return sorted({k.split("__")[1].lower() for k in os.environ if k.startswith("OFFLOAD__") and k.count("__") >= 2})


def _env_overrides(site: str) -> dict[str, tuple[str, Any]]:
    """``key -> (variable, value)`` from ``OFFLOAD__<SITE>__<KEY>`` variables (the variable, for messages)."""
    prefix = f"OFFLOAD__{site.upper().replace('-', '_')}__"
    overrides: dict[str, tuple[str, Any]] = {}
    for key, value in os.environ.items():
        if key.startswith(prefix):
            overrides[key[len(prefix) :].lower()] = (key, _parse_env_value(value))
    return overrides


def _parse_env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _validate_site(
    file: Path, name: str, table: dict[str, Any], base: SiteConfig, overrides: dict[str, tuple[str, Any]] | None = None
) -> SiteConfig:
    where = f"{file}: [sites.{name}]"
    values: dict[str, Any] = {}
    given = [(key, value, where) for key, value in table.items()]
    for key, (var, value) in (overrides or {}).items():
        given.append((key, value, f"environment variable {var} (site {name!r})"))
    scheduler = next((v for k, v, _ in reversed(given) if k == "scheduler"), base.scheduler)
    plugin_keys = _scheduler_keys(scheduler)
    extra: dict[str, Any] = {}
    for key, value, origin in given:
        if key in plugin_keys and key not in FIELDS:
            extra[key] = _plugin_value(origin, scheduler, key, plugin_keys[key], value)
            continue
        if key not in FIELDS:
            known = [*FIELDS, *plugin_keys]
            valid = ", ".join(sorted(known))
            raise ConfigError(f"{origin}: unknown key {key!r}{did_you_mean(key, known)}. Valid keys: {valid}.")
        values[key] = check_value(origin, key, value)
    if extra:
        values["scheduler_keys"] = {**base.scheduler_keys, **extra}
    if "transport" not in values and values.get("host") is None and base.host is None and name != LOCAL_SITE:
        raise ConfigError(f"{where}: no 'host'. Give the login node's name or an alias of ~/.ssh/config.")
    config = dataclasses.replace(base, source=str(file), **values)
    if config.transport == "ssh" and not config.host:
        raise ConfigError(f"{where}: transport 'ssh' needs a 'host'")
    if config.gpus_per_node is not None and config.gpus_per_node < 0:
        raise ConfigError(f"{where}: gpus_per_node cannot be negative")
    if config.port is not None and not 0 < config.port < 65536:
        raise ConfigError(f"{where}: port {config.port} is not a TCP port")
    if config.poll_interval <= 0:
        raise ConfigError(f"{where}: poll_interval must be positive (seconds)")
    if config.command_timeout <= 0 or config.connect_timeout <= 0:
        raise ConfigError(f"{where}: command_timeout and connect_timeout must be positive (seconds)")
    if config.max_sessions < 1:
        raise ConfigError(f"{where}: max_sessions must be at least 1")
    try:
        parse_walltime(config.walltime)
    except ConfigError as exc:
        raise ConfigError(f"{where}: key 'walltime': {exc}") from None
    if not config.shebang.startswith("#!") or "\n" in config.shebang:
        raise ConfigError(
            f"{where}: shebang {config.shebang!r} must be one line starting with '#!', e.g. '#!/bin/bash -l'"
        )
    _check_plugins(where, config)
    return config


def _plugin_value(origin: str, scheduler: str, key: str, kind: type | tuple[str, ...], value: Any) -> Any:
    """A value of a key the scheduler plugin declares: of its type, or one of its choices (a tuple of strings)."""
    if isinstance(kind, tuple):
        if value not in kind:
            hint = did_you_mean(value, list(kind)) if isinstance(value, str) else ""
            raise ConfigError(f"{origin}: key {key!r} of scheduler {scheduler!r} must be one of {', '.join(kind)}, "
                              f"got {value!r}{hint}")  # fmt: skip
        return value
    if not isinstance(value, kind) or isinstance(value, bool) is not (kind is bool):
        raise ConfigError(f"{origin}: key {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _scheduler_keys(scheduler: Any) -> dict[str, type | tuple[str, ...]]:
    """The profile keys a scheduler plugin declares (``profile_keys``: name -> a type, or a tuple of the strings
    it may be); none if it is unknown (the unknown scheduler is reported on its own)."""
    plugin = plugins().schedulers.get(scheduler) if isinstance(scheduler, str) else None
    return dict(getattr(plugin.factory, "profile_keys", {})) if plugin else {}


def _check_plugins(where: str, config: SiteConfig) -> None:
    """An unknown scheduler, runtime or transport is a profile mistake: say which key and what is known."""
    registry = plugins()
    for key, known in (("scheduler", registry.schedulers), ("runtime", registry.runtimes),
                       ("transport", registry.transports)):  # fmt: skip
        value = getattr(config, key)
        if value not in known:
            raise ConfigError(
                f"{where}: {key} = {value!r} is not one offload knows{did_you_mean(value, list(known))}. "
                f"Known: {', '.join(sorted(known))} (a plugin package adds others)."
            )
