"""The plugin manager facade: built-ins first, then entry points (group ``offload``), then a check that
every hook implementation matches a spec, so a misspelt hook fails loudly instead of being ignored.
"""

from __future__ import annotations

import functools
from typing import Any

import pluggy

from offload import hookspecs
from offload.errors import PluginError
from offload.hookspecs import RuntimePlugin, SchedulerPlugin, TransportPlugin


class Plugins:
    """What the registered plugins provide, by kind and name."""

    def __init__(self, manager: pluggy.PluginManager) -> None:
        self.manager = manager
        self.schedulers: dict[str, SchedulerPlugin] = self._collect("offload_schedulers", SchedulerPlugin)
        self.runtimes: dict[str, RuntimePlugin] = self._collect("offload_runtimes", RuntimePlugin)
        self.transports: dict[str, TransportPlugin] = self._collect("offload_transports", TransportPlugin)

    def _collect(self, hook_name: str, record: type) -> dict[str, Any]:
        found: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for impl in getattr(self.manager.hook, hook_name).get_hookimpls():
            for item in impl.function() or ():
                if not isinstance(item, record):
                    raise PluginError(f"plugin {impl.plugin_name!r}: {hook_name} must yield {record.__name__}")
                if item.name in found:
                    raise PluginError(
                        f"{record.__name__} {item.name!r} is provided by both {owner[item.name]!r} and "
                        f"{impl.plugin_name!r}: uninstall one of them"
                    )
                found[item.name] = item
                owner[item.name] = impl.plugin_name
        return found

    def _pick(self, kind: str, table: dict[str, Any], name: str) -> Any:
        if name not in table:
            raise PluginError(
                f"no {kind} named {name!r}; known: {', '.join(sorted(table))}. "
                f"A third-party {kind} is installed as a package with an 'offload' entry point."
            )
        return table[name]

    def scheduler(self, name: str) -> SchedulerPlugin:
        return self._pick("scheduler", self.schedulers, name)

    def runtime(self, name: str) -> RuntimePlugin:
        return self._pick("runtime", self.runtimes, name)

    def transport(self, name: str) -> TransportPlugin:
        return self._pick("transport", self.transports, name)


def new_manager(*extra: object, entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the built-ins, then ``extra`` plugins, then installed entry points."""
    from offload import builtin_plugins

    manager = pluggy.PluginManager("offload")
    manager.add_hookspecs(hookspecs)
    manager.register(builtin_plugins, name="offload.builtin")
    for plugin in extra:
        manager.register(plugin)
    if entry_points:
        manager.load_setuptools_entrypoints("offload")
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"a plugin implements a hook offload does not have: {exc}") from None
    return manager


@functools.cache
def plugins() -> Plugins:
    """The process-wide plugins (built-ins and installed entry points)."""
    return Plugins(new_manager())
