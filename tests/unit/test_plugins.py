import dataclasses
import inspect

import pytest

import offload
from offload import PluginError, RuntimePlugin, SchedulerPlugin, hookimpl, hookspecs
from offload.plugins import Plugins, new_manager
from offload.runtimes.none import NoRuntime


def test_every_hook_is_documented():
    hooks = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("offload_")]
    assert len(hooks) == 4
    for hook in hooks:
        assert hook.__doc__ and len(hook.__doc__.split()) > 15, hook.__name__


def test_builtins_register_through_the_hooks():
    registry = Plugins(new_manager(entry_points=False))
    assert {"slurm", "local"} <= set(registry.schedulers)
    assert {"apptainer", "singularity", "charliecloud", "podman", "none"} <= set(registry.runtimes)
    assert {"ssh", "local"} <= set(registry.transports)


class ThirdPartyRuntime:
    @hookimpl
    def offload_runtimes(self):
        yield RuntimePlugin("enroot", lambda options: NoRuntime(options))


def test_a_third_party_plugin_registers_a_runtime():
    registry = Plugins(new_manager(ThirdPartyRuntime(), entry_points=False))
    assert "enroot" in registry.runtimes
    assert registry.runtime("enroot").factory(()).command(["x"], None) == ["x"]


class ClaimsSlurm:
    @hookimpl
    def offload_schedulers(self):
        yield SchedulerPlugin("slurm", object)


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    with pytest.raises(PluginError, match=r"both 'offload.builtin' and '.*'"):
        Plugins(new_manager(ClaimsSlurm(), entry_points=False))


class Misspelt:
    @hookimpl
    def offload_runtime(self):  # missing the s
        return []


def test_a_misspelt_hook_fails_loudly():
    with pytest.raises(PluginError, match="does not have"):
        new_manager(Misspelt(), entry_points=False)


def test_unknown_plugin_name_lists_the_known_ones():
    registry = Plugins(new_manager(entry_points=False))
    with pytest.raises(PluginError, match="known: .*apptainer"):
        registry.runtime("dockerd")


class SmallScheduler(offload.Scheduler):
    """A scheduler plugin that gives only what it must: the rest are offload.Scheduler's defaults."""

    name = "small"


class NotDerived:
    def __init__(self, config):
        self.config = config


class TwoSchedulers:
    @hookimpl
    def offload_schedulers(self):
        yield SchedulerPlugin("small", SmallScheduler)
        yield SchedulerPlugin("bare", NotDerived)


def test_a_plugin_derives_from_the_base_class_and_gets_its_defaults(tmp_path):
    registry = Plugins(new_manager(TwoSchedulers(), entry_points=False))
    config = offload.SiteConfig(name="s", transport="local", scheduler="small", runtime="none", workdir=str(tmp_path))
    site = offload.Site(config, registry=registry)
    assert site.scheduler.job_env == () and site.scheduler.commands == () and not site.scheduler.runs_on_client
    with pytest.raises(NotImplementedError, match="'small' does not give directives"):
        site.scheduler.directives(offload.JobSpec(["x"]), "/d", None)
    with pytest.raises(PluginError, match="'bare' made a NotDerived, which does not derive from offload.Scheduler"):
        offload.Site(dataclasses.replace(config, scheduler="bare"), registry=registry)
    assert not site.runtime.runs_containers and site.runtime.read_only_binds
    site.close()
