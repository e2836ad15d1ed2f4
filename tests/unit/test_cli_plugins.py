"""The CLI takes sub-commands from plugins (entry point group ``offload.cli``) and imports no adapter itself:
``offload interlink`` comes through its entry point, a plugin is imported only when its command runs, one whose
extra is missing is listed and says what to install, and a plugin may not take one of offload's own names."""

from __future__ import annotations

import ast
import logging
import signal
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import offload
import offload.cli

ADAPTERS = {"interlink_offload", "jupyterhub_offload", "dask_offload", "airflow_offload"}

PLUGIN = '''
import click


@click.group()
def fancy():
    """Fancy things."""


@fancy.command()
@click.option("--who", default="world")
def hello(who):
    click.echo(f"hello {who}")
'''


@pytest.fixture
def offload_cli():
    """Run ``offload ARGS...`` in this process; what the CLI sets up for itself (the SIGTERM handler, the
    ``offload`` logger on stderr) is put back afterwards, so other tests see neither."""
    logger = logging.getLogger("offload")
    saved = (list(logger.handlers), logger.level, logger.propagate, signal.getsignal(signal.SIGTERM))

    def run(*args: str) -> Result:
        return CliRunner().invoke(offload.cli.main, list(args))

    yield run
    logger.handlers[:], logger.level, logger.propagate = saved[:3]
    signal.signal(signal.SIGTERM, saved[3])


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """Replace the installed ``offload.cli`` entry points by ``NAME=VALUE`` pairs; the module ``fancy_cli``
    (PLUGIN) can be named, and is forgotten afterwards."""
    (tmp_path / "fancy_cli.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fancy_cli", raising=False)

    def install(**found: str) -> None:
        eps = [EntryPoint(name=name, value=value, group=offload.cli.ENTRY_POINT_GROUP) for name, value in found.items()]
        monkeypatch.setattr(offload.cli, "_entry_points", lambda: eps)

    yield install
    sys.modules.pop("fancy_cli", None)


def test_interlink_serve_comes_through_its_entry_point(offload_cli):
    listed = offload_cli("--help")
    assert listed.exit_code == 0, listed.output
    assert "interlink" in listed.stdout

    result = offload_cli("interlink", "serve", "--help")
    assert result.exit_code == 0, result.output
    assert "Serve interLink's plugin API" in result.stdout
    for option in ("--site", "--listen", "--image-map", "--public", "--public-name", "--token-file"):
        assert option in result.stdout


def test_a_plugin_adds_a_command_and_is_imported_only_when_it_runs(offload_cli, entry_points):
    entry_points(fancy="fancy_cli:fancy")
    listed = offload_cli("--help")
    assert listed.exit_code == 0, listed.output
    assert "fancy" in listed.stdout and "From the plugin fancy_cli." in listed.stdout
    assert "fancy_cli" not in sys.modules, "listing the commands imported the plugin"

    result = offload_cli("fancy", "hello", "--who", "site")
    assert result.exit_code == 0, result.output
    assert result.stdout == "hello site\n"
    assert "Fancy things." in offload_cli("fancy", "--help").stdout


def test_a_plugin_whose_extra_is_missing_is_listed_and_says_what_to_install(offload_cli, monkeypatch):
    """The real interLink entry point without aiohttp: the package's own message, once, through the CLI."""
    for name in [m for m in sys.modules if m == "interlink_offload" or m.startswith("interlink_offload.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # `import aiohttp` raises ImportError

    listed = offload_cli("--help")
    assert listed.exit_code == 0, listed.output
    assert "interlink" in listed.stdout
    assert offload_cli("image", "--help").exit_code == 0

    result = offload_cli("interlink", "serve", "--site", "local")
    assert result.exit_code == 2
    assert result.stderr.startswith("offload: error: 'offload interlink' cannot run: interlink_offload needs aiohttp")
    assert "pip install 'offload[interlink]'" in result.stderr


def test_a_plugin_that_takes_a_builtin_name_is_refused(offload_cli, entry_points):
    entry_points(run="fancy_cli:fancy")
    result = offload_cli("run", "--help")
    assert result.exit_code == 0, result.output
    assert "Run COMMAND in a container" in result.stdout  # offload's own run
    assert "the plugin 'run = fancy_cli:fancy' is refused: 'run' is one of offload's own commands" in result.stderr
    assert "fancy_cli" not in sys.modules


def test_two_plugins_with_one_name_are_both_named(offload_cli, entry_points, monkeypatch):
    eps = [
        EntryPoint(name="fancy", value=value, group=offload.cli.ENTRY_POINT_GROUP)
        for value in ("fancy_cli:fancy", "other_cli:fancy")
    ]
    monkeypatch.setattr(offload.cli, "_entry_points", lambda: eps)
    result = offload_cli("fancy", "hello")
    assert result.exit_code == 2
    assert "'fancy = fancy_cli:fancy' and 'fancy = other_cli:fancy': uninstall one of them" in result.stderr


def test_an_entry_point_that_is_no_command_is_reported(offload_cli, entry_points):
    entry_points(fancy="fancy_cli:click")
    result = offload_cli("fancy")
    assert result.exit_code == 2
    assert "the plugin 'fancy = fancy_cli:click' names a module, not a click command" in result.stderr


def test_the_core_imports_no_adapter():
    core = Path(offload.__file__).parent
    found = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found += [f"{path.relative_to(core)}:{node.lineno} {n}" for n in names if n.split(".")[0] in ADAPTERS]
    assert len(list(core.rglob("*.py"))) > 20  # the core's sources, not an empty tree
    assert not found, found
