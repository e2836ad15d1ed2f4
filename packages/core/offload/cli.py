"""The ``offload`` command: run a container on N GPUs, follow it, and manage sites.

User errors print one line of cause and remedy and exit 2; ``run`` exits with the job's own exit code.

Plugins add sub-commands through the entry point group ``offload.cli`` (a name -> a ``click.Command`` or
``click.Group``), so the core never imports an adapter: ``offload interlink`` is interlink_offload's. Their
names are listed without importing them, and a plugin is imported only when its command runs: one whose extra is
not installed cannot break ``offload --help`` or the other commands.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from offload import _loop
from offload.cli_common import SITE_HELP, fail, log_to_stderr, user_errors
from offload.errors import ConfigError
from offload.jobs import Job, JobState, JobStatus
from offload.placement import DEFAULT_PATIENCE, POLICIES, load_sites, names_several, resume_placement
from offload.profiles import load_profiles
from offload.records import JobRecords, write_private
from offload.schedulers.base import NodeResources
from offload.site import Site, load_site
from offload.sizes import format_size, parse_size
from offload.spec import JobSpec, Mount, Resources


def _env_pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    """NAME=VALUE pairs; a bare NAME takes this machine's value of $NAME (like ``docker run -e NAME``), so a
    secret need never sit on a command line, in ``ps`` or in the shell's history."""
    pairs = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep:
            if name not in os.environ:
                raise ConfigError(f"{option} {name}: give NAME=VALUE, or set ${name} here to pass its value")
            value = os.environ[name]
        pairs[name] = value
    return pairs


def _local_files(items: tuple[str, ...]) -> dict[str, bytes]:
    """--file PATH[:NAME]: a file, or a directory (sent as one archive, unpacked in the job's directory)."""
    from offload.spec import archive

    staged = {}
    for item in items:
        path, _, name = item.partition(":")
        source = os.path.expanduser(path)
        target = name or os.path.basename(os.path.normpath(source))
        if os.path.isdir(source):
            staged[target.removesuffix("/") + "/"] = archive(source)
        elif os.path.isfile(source):
            with open(source, "rb") as f:
                staged[target] = f.read()
        else:
            raise ConfigError(f"--file {path!r}: no such file or directory here")
    return staged


# -- commands from plugins -----------------------------------------------------------------------------

ENTRY_POINT_GROUP = "offload.cli"


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed ``offload.cli`` entry points (the one place the CLI asks for them)."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def _plugin_name(entry_point: importlib.metadata.EntryPoint) -> str:
    """How a message names a plugin: its entry point, and the package that declares it."""
    package = f" (package {entry_point.dist.name})" if entry_point.dist else ""
    return f"'{entry_point.name} = {entry_point.value}'{package}"


class _PluginCommand(click.Command):
    """A plugin's command as the listing shows it: a name and a short help, so ``offload --help`` imports no
    plugin. The plugin is imported when its command runs or shows its own help; if it cannot be (its extra is
    not installed), the command fails then with the plugin's ImportError, which says what to install, and no
    other command notices."""

    def __init__(self, name: str, entry_points: list[importlib.metadata.EntryPoint]) -> None:
        packages = ", ".join(sorted({ep.module.partition(".")[0] for ep in entry_points}))
        super().__init__(name, short_help=f"From the plugin {packages}.")
        self.entry_points = entry_points

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        return self.load().make_context(info_name, args, parent=parent, **extra)

    def load(self) -> click.Command:
        if len(self.entry_points) > 1:
            plugins = " and ".join(_plugin_name(ep) for ep in self.entry_points)
            fail(f"the command '{self.name}' is provided by both {plugins}: uninstall one of them")
        entry_point = self.entry_points[0]
        try:
            command = entry_point.load()
        except ImportError as exc:  # an adapter's says which extra to install
            fail(f"'offload {self.name}' cannot run: {exc}")
        if not isinstance(command, click.Command):
            fail(f"the plugin {_plugin_name(entry_point)} names a {type(command).__name__}, not a click command")
        return command


class _OffloadGroup(click.Group):
    """offload's own commands, then one per ``offload.cli`` entry point (found once per invocation, by name)."""

    def _plugins(self, ctx: click.Context) -> dict[str, _PluginCommand]:
        meta = ctx.find_root().meta
        if ENTRY_POINT_GROUP not in meta:
            found: dict[str, list[importlib.metadata.EntryPoint]] = {}
            for entry_point in _entry_points():
                if entry_point.name in self.commands:
                    click.echo(
                        f"offload: error: the plugin {_plugin_name(entry_point)} is refused: '{entry_point.name}' "
                        "is one of offload's own commands; uninstall the plugin or ask its authors to rename it",
                        err=True,
                    )
                    continue
                found.setdefault(entry_point.name, []).append(entry_point)
            meta[ENTRY_POINT_GROUP] = {name: _PluginCommand(name, eps) for name, eps in found.items()}
        return meta[ENTRY_POINT_GROUP]

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self._plugins(ctx)])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        plugins = self._plugins(ctx)  # first, so a refused plugin is said whichever command runs
        return super().get_command(ctx, cmd_name) or plugins.get(cmd_name)


# -- the command ---------------------------------------------------------------------------------------


@click.group(cls=_OffloadGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="offload")
def main() -> None:
    """Run containerised work as jobs on remote HPC sites, over one SSH connection."""
    # offload's own news (connecting..., a site that stops answering) on stderr, as the CLI's other lines
    log_to_stderr("offload", "offload")
    # SIGTERM is Ctrl-C from the start, not only once a job is followed: one that comes mid-submission then
    # cancels what got in (a default SIGTERM would end the process while sbatch still runs, and the job would
    # land later, unrecorded).
    signal.signal(signal.SIGTERM, _raise_interrupt)


# -- sites ---------------------------------------------------------------------------------------------


@main.group()
def sites() -> None:
    """List, inspect and trust site profiles."""


@sites.command("list")
def sites_list() -> None:
    """The configured sites (and the built-in 'local')."""
    with user_errors():
        profiles = load_profiles()
    default = profiles.get(None).name
    click.echo(f"# {profiles.path}")
    for name, site in sorted(profiles.sites.items()):
        where = site.host or "this machine"
        mark = "*" if name == default else " "
        click.echo(f"{mark} {name:<16} {where:<28} {site.scheduler}/{site.runtime}")


@sites.command("show")
@click.argument("name", required=False)
def sites_show(name: str | None) -> None:
    """Every key of one site profile as TOML you can paste into the config; defaults are marked."""
    from offload.config import SiteConfig, local_site_config

    with user_errors():
        config = load_profiles().get(name)
    base = local_site_config() if config.name == "local" else SiteConfig(name=config.name)
    click.echo(f"# {config.source}")
    click.echo(f"[sites.{config.name}]")
    for key, value in vars(config).items():
        if key in ("name", "source"):
            continue
        if key in ("private_key", "host_keys") and value:
            click.echo(f"# {key} = (given, not shown)")
            continue
        default = value == getattr(base, key)
        if value is None:
            click.echo(f"# {key} = (unset)")
            continue
        click.echo(f"{key} = {_toml(value)}" + ("  # default" if default else ""))


def _toml(value: Any) -> str:
    """A value as TOML writes it (strings quoted and escaped, lists, tables)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


@sites.command("gpus")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON: partitions and nodes with free/total counts.")
def sites_gpus(name: str | None, as_json: bool) -> None:
    """Free and total GPUs per partition and per node, from one scheduler call."""
    with user_errors():
        site = load_site(name)
        nodes = site.nodes()
    report = gpu_report(nodes)
    if as_json:
        import json

        click.echo(json.dumps({"site": site.name, **report}, indent=2))
        return
    click.echo(f"{'PARTITION':<16} {'NODES':>5} {'GPUS FREE/TOTAL':>16} {'CPUS FREE/TOTAL':>16}")
    for part, row in report["partitions"].items():
        click.echo(f"{part:<16} {len(row['nodes']):>5} {row['gpus_free']:>7}/{row['gpus']:<8} "
                   f"{row['cpus_free']:>7}/{row['cpus']:<8}")  # fmt: skip
    click.echo("")
    click.echo(f"{'NODE':<16} {'STATE':<8} {'GPUS FREE/TOTAL':>16} {'CPUS FREE/TOTAL':>16}  PARTITIONS")
    for node in report["nodes"]:
        click.echo(f"{node['name']:<16} {node['state']:<8} {node['gpus_free']:>7}/{node['gpus']:<8} "
                   f"{node['cpus_free']:>7}/{node['cpus']:<8}  {','.join(node['partitions'])}")  # fmt: skip


def gpu_report(nodes: list[NodeResources]) -> dict[str, Any]:
    """Free/total GPUs and CPUs per partition and per node (what ``sites gpus`` and ``doctor`` show)."""
    partitions: dict[str, dict[str, Any]] = {}
    for node in nodes:
        for part in node.partitions:
            row = partitions.setdefault(part, {"nodes": [], "gpus": 0, "gpus_free": 0, "cpus": 0, "cpus_free": 0})
            row["nodes"].append(node.name)
            row["gpus"] += node.gpus
            row["gpus_free"] += node.gpus_free
            row["cpus"] += node.cpus
            row["cpus_free"] += node.cpus_free
    rows = [{"name": n.name, "state": n.state, "partitions": list(n.partitions), "gpus": n.gpus,
             "gpus_free": n.gpus_free, "cpus": n.cpus, "cpus_free": n.cpus_free} for n in nodes]  # fmt: skip
    return {"partitions": partitions, "nodes": rows}


@sites.command("rank")
@click.option("--site", "site_names", default=None, help="Sites to rank: 'a,b' or '@group' (default: every site "
              "of the profile file but 'local').")  # fmt: skip
@click.option("--gpus", type=int, default=0, show_default=True, help="GPUs for the whole job.")
@click.option("--nodes", type=int, default=1, show_default=True)
@click.option("--cpus", type=int, help="CPU cores for each copy of the payload.")
@click.option("--time", "walltime", help="Walltime, HH:MM:SS or D-HH:MM:SS.")
@click.option("--partition", help="Partition (default: each site's; its GPU partition when --gpus).")
@click.option("--estimate", is_flag=True, help="Also ask each scheduler when it plans to start the job (SLURM: "
              "sbatch --test-only, which submits nothing), corrected by what offload learnt of each site's plans, "
              "and rank by that (what --policy estimate does).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON: each site's verdict and evidence.")
def sites_rank(site_names: str | None, gpus: int, nodes: int, cpus: int | None, walltime: str | None,
               partition: str | None, estimate: bool, as_json: bool) -> None:  # fmt: skip
    """Where a job would start first: each site's verdict (can it run the job at all, could it start it now)
    and its evidence, best first, from one scheduler call per site (two with --estimate). 'offload run --site
    a,b' submits there."""
    with user_errors():
        profiles = load_profiles()
        names = site_names or ",".join(name for name in profiles.sites if name != "local")
        spec = JobSpec(["true"], resources=Resources(gpus=gpus, nodes=nodes, cpus=cpus, walltime=walltime,
                                                     partition=partition))  # fmt: skip
        verdicts = load_sites(names).rank(spec, estimate=estimate)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(v) for v in verdicts], indent=2))
        return
    click.echo(f"{'SITE':<16} {'VERDICT':<10} {'GPUS FREE/TOTAL':>16} {'CPUS FREE':>10}  WHY")
    for v in verdicts:
        verdict = "now" if v.starts_now else "waits" if v.feasible else "skipped"
        plan = f"; {v.expected.note}" if v.feasible and v.expected is not None and v.expected.note else ""
        click.echo(f"{v.site:<16} {verdict:<10} {v.gpus_free:>7}/{v.gpus:<8} {v.cpus_free:>10}  {v.reason}{plan}")


@sites.command("trust")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Record the key without asking (only after checking the fingerprint).")
@click.option("--replace", is_flag=True, help="Replace a different key already recorded for this host.")
def sites_trust(name: str, yes: bool, replace: bool) -> None:
    """Show a site's SSH host key fingerprint and record it in known_hosts."""
    from offload.transports.ssh import fetch_host_key, known_hosts_line, known_hosts_path

    with user_errors():
        config = load_profiles().get(name)
        if config.transport != "ssh":
            raise ConfigError(f"site '{name}' is not reached over SSH: nothing to trust")
        key = _loop.run(fetch_host_key(config))
        line = _loop.run(known_hosts_line(config, key))
        path = known_hosts_path(config)
        click.echo(f"{config.host} presents a {key.get_algorithm()} key: {key.get_fingerprint('sha256')}")
        existing = path.read_text().splitlines() if path.exists() else []
        if line.strip() in existing:
            click.echo(f"already trusted in {path}")
            return
        pattern = line.split()[0]
        others = [entry for entry in existing if entry.split()[:1] == [pattern]]
        if others and not replace:
            fail(
                f"{path} already trusts a different key for {pattern}. If the site really changed its key "
                "(ask its admins), run again with --replace; otherwise someone may be intercepting the connection"
            )
        if not yes and not click.confirm("Compare it with the fingerprint your site publishes. Trust it?"):
            fail("not trusted; nothing was written")
        kept = [entry for entry in existing if entry not in others]
        write_private(path, "".join(f"{entry}\n" for entry in kept) + line)
        click.echo(f"recorded in {path}" + (f" (replacing {len(others)} old key(s))" if others else ""))


# -- doctor --------------------------------------------------------------------------------------------


@main.command()
@click.argument("site_name", metavar="SITE", required=False)
@click.option("--no-job", is_flag=True, help="Skip the checks that run a small job (the compute nodes' network).")
def doctor(site_name: str | None, no_job: bool) -> None:
    """Check a site end to end: connection, host key, scheduler, runtime, image, work dir, partitions and GPUs,
    and (with a one-minute job) whether compute nodes have outbound network."""
    from offload.doctor import run_checks

    with user_errors():
        config = load_profiles().get(site_name)
    failed = 0
    for check in run_checks(config, network=not no_job):
        mark = {"ok": "PASS", "fail": "FAIL", "skip": "SKIP"}[check.outcome]
        click.echo(f"{mark:<5} {check.name:<16} {check.detail}")
        if check.outcome == "fail":
            failed += 1
            click.echo(f"{'':<22}fix: {check.fix}")
    sys.exit(1 if failed else 0)


# -- images --------------------------------------------------------------------------------------------


@main.group()
def image() -> None:
    """A site's image cache: pull a registry image once on the login node, push one made here, list, remove."""


@image.command("pull")
@click.argument("ref")
@click.option("--site", "site_name", help=SITE_HELP)
def image_pull(ref: str, site_name: str | None) -> None:
    """Pull REF (docker://HOST/REPO:TAG) on the site's login node into its cache, converted for its runtime.
    Jobs naming REF then run the cached image; a tag whose digest is cached already is not pulled again."""
    with user_errors():
        cached = load_site(site_name).images.pull(ref)
    click.echo(f"{cached.ref}  {cached.digest}  {format_size(cached.size)}  {cached.path}")


@image.command("push")
@click.argument("path", type=click.Path(exists=True, dir_okay=True, path_type=str))
@click.option("--name", required=True, help="What jobs call it: --image NAME, image=NAME.")
@click.option("--site", "site_name", help=SITE_HELP)
def image_push(path: str, name: str, site_name: str | None) -> None:
    """Send the image at PATH to the site as NAME: a root file system (a directory or a tarball), a 'docker
    save' or OCI archive, or a .sif. An interrupted push of the same image carries on where it stopped."""
    with user_errors():
        cached = load_site(site_name).images.push(path, name)
    click.echo(f"{cached.name}  {cached.digest}  {format_size(cached.size)}  {cached.path}")


@image.command("ls")
@click.option("--site", "site_name", help=SITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
def image_ls(site_name: str | None, as_json: bool) -> None:
    """The site's cached images: name, digest, size, last used."""
    with user_errors():
        images = load_site(site_name).images.list()
    if as_json:
        for cached in images:
            click.echo(json.dumps(dataclasses.asdict(cached)))
        return
    rows = [(c.name, c.digest[:19], format_size(c.size), time.strftime("%Y-%m-%d %H:%M", time.localtime(c.used)))
            for c in images]  # fmt: skip
    _table(("IMAGE", "DIGEST", "SIZE", "LAST USED"), rows)


@image.command("rm")
@click.argument("images", metavar="IMAGE...", nargs=-1, required=True)
@click.option("--site", "site_name", help=SITE_HELP)
def image_rm(images: tuple[str, ...], site_name: str | None) -> None:
    """Forget images (by name, ref or digest); their files go when no other name uses them."""
    with user_errors():
        site = load_site(site_name)
        for wanted in images:
            for gone in site.images.remove(wanted):
                click.echo(f"removed {gone.name}")


@image.command("prune")
@click.option("--older-than", "days", type=float, default=0, help="Remove images unused for this many days.")
@click.option("--max-size", help="Then remove the least recently used until the cache holds at most this, e.g. 50G.")
@click.option("--site", "site_name", help=SITE_HELP)
def image_prune(days: float, max_size: str | None, site_name: str | None) -> None:
    """Free the cache: images unused for a while, then the oldest beyond a size."""
    with user_errors():
        if not days and not max_size:
            raise ConfigError("give --older-than DAYS and/or --max-size SIZE")
        try:
            limit = parse_size(max_size) if max_size else 0
        except ValueError:
            raise ConfigError(f"--max-size {max_size!r}: give a size such as 500M or 50G") from None
        gone = load_site(site_name).images.prune(days, limit)
    for cached in gone:
        click.echo(f"removed {cached.name} ({format_size(cached.size)})")
    if not gone:
        click.echo("nothing to remove")


# -- run -----------------------------------------------------------------------------------------------


class _CommandAfterDashes(click.Command):
    """A command whose last argument is a command line to run: an unknown option most often belongs to it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as exc:
            raise click.UsageError(
                f"{exc.format_message()} If it belongs to the command to run, put that command after '--': "
                f"offload {ctx.info_name} [OPTIONS] -- COMMAND {exc.option_name} ...",
                ctx,
            ) from None


@main.command(cls=_CommandAfterDashes)
@click.option("--site", "site_name", help=SITE_HELP + " Several, 'a,b' or '@group' (the profile file's [groups]): "
              "the job goes where it starts first ('offload sites rank' shows why).")  # fmt: skip
@click.option("--gpus", type=int, default=0, show_default=True, help="GPUs for the whole job.")
@click.option("--cpus", type=int, help="CPU cores for each copy of the payload.")
@click.option("--memory", help="Memory per node, e.g. 16G.")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes; the payload runs once on each.")
@click.option("--gpus-per-node", type=int, help="GPUs on each node (instead of --gpus).")
@click.option("--tasks-per-node", type=int, help="Copies of the payload on each node (default 1).")
@click.option("--time", "walltime", help="Walltime, HH:MM:SS or D-HH:MM:SS.")
@click.option("--partition", help="Partition (default: the site's; its GPU partition when --gpus).")
@click.option("--account")
@click.option("--qos")
@click.option("--image", help="Container image (default: the site's).")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Environment for the payload (repeatable).")
@click.option(
    "--secret",
    "secret",
    multiple=True,
    metavar="K[=V]",
    help="Secret env var, never written to scripts; a bare K takes $K from here (repeatable).",
)
@click.option(
    "--reach",
    "reach",
    multiple=True,
    metavar="K[=URL]",
    help="A service on your side the job reaches as $K through offload's connection, e.g. "
    "--reach MLFLOW_TRACKING_URI=http://127.0.0.1:5000; a bare K takes $K from here (repeatable).",
)
@click.option("--mount", "mounts", multiple=True, metavar="SRC[:DST[:ro]]", help="Bind a site path (repeatable).")
@click.option("--workdir", help="Working directory inside the container (default: the job's directory).")
@click.option(
    "--file",
    "files",
    multiple=True,
    metavar="PATH[:NAME]",
    help="Stage a local file or directory into the job's directory (repeatable), e.g. --file train.py",
)
@click.option("--name", help="Job name.")
@click.option("--detach", is_flag=True, help="Submit, print the job id and return; the job keeps running.")
@click.option("--policy", type=click.Choice(POLICIES), default="first-fit", show_default=True,
              help="With several sites: 'first-fit' submits once, where it starts first; 'race' submits to the "
              "--width best sites and the first to start runs it (exactly once), the others are cancelled; "
              "'failover' tries one site at a time, moving on when a site says it will never start it or the "
              "attempt is overdue; 'estimate' is failover in the order of the schedulers' plans (sbatch "
              "--test-only, corrected by what offload learnt of each site).")  # fmt: skip
@click.option("--width", type=int, default=2, show_default=True, help="With --policy race: sites raced at once.")
@click.option("--patience", type=float, default=DEFAULT_PATIENCE, show_default=True,
              help="With race, failover, estimate: seconds an attempt may wait past its expected start before the "
              "next site gets an attempt too (the waiting one keeps its place).")  # fmt: skip
@click.argument("command", nargs=-1, required=True)
def run(
    site_name: str | None,
    gpus: int,
    cpus: int | None,
    memory: str | None,
    nodes: int,
    gpus_per_node: int | None,
    tasks_per_node: int | None,
    walltime: str | None,
    partition: str | None,
    account: str | None,
    qos: str | None,
    image: str | None,
    env: tuple[str, ...],
    secret: tuple[str, ...],
    reach: tuple[str, ...],
    mounts: tuple[str, ...],
    workdir: str | None,
    files: tuple[str, ...],
    name: str | None,
    detach: bool,
    policy: str,
    width: int,
    patience: float,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND in a container on the site, stream its output, exit with its exit code.

    Put the command after '--':  offload run --gpus 2 -- python3 train.py --epochs 3
    """
    with user_errors():
        spec = JobSpec(
            command=command,
            image=image,
            resources=Resources(
                nodes=nodes,
                gpus_per_node=gpus_per_node,
                tasks_per_node=tasks_per_node,
                cpus=cpus,
                memory=memory,
                gpus=gpus,
                walltime=walltime,
                partition=partition,
                account=account,
                qos=qos,
            ),
            env=_env_pairs(env, "--env"),
            secrets=_env_pairs(secret, "--secret"),
            reach=_env_pairs(reach, "--reach"),
            mounts=tuple(Mount.parse(m) for m in mounts),
            workdir=workdir,
            name=name,
            files=_local_files(files),
        )
        _check_policy(policy, site_name, detach)
        if names_several(site_name):  # several sites: where it starts first
            group = load_sites(site_name)
            verdicts = group.rank(spec, estimate=policy != "first-fit")
            for verdict in verdicts:
                click.echo(f"offload: {verdict.site}: {verdict.describe()}", err=True)
            submit = functools.partial(group.submit, ranked=verdicts, policy=policy, width=width, patience=patience,
                                       say=_say)  # fmt: skip
        else:
            single = load_site(site_name)
            single.validate(spec)
            submit = single.submit
        try:
            job = submit(spec)
        except KeyboardInterrupt as exc:  # the submission goes on to its end, then what got in is cancelled
            click.echo("\noffload: interrupted during the submission; a job that got in is cancelled", err=True)
            sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
    click.echo(f"offload: submitted job {job.id} to site '{job.site.name}'", err=True)
    if detach:
        if spec.reach:
            click.echo(f"offload: the job reaches {', '.join(spec.reach)} only while a client serves its relay: "
                       f"run 'offload relay {job.id}' (it ends with the job)", err=True)  # fmt: skip
        click.echo(job.id)
        return
    sys.exit(_follow(job, cancel_on_interrupt=True))


def _check_policy(policy: str, site_name: str | None, detach: bool) -> None:
    """Refuse a racing policy without several sites, or with --detach, before anything is submitted."""
    if policy != "first-fit" and not names_several(site_name):
        raise ConfigError(f"--policy {policy} places a job over several sites: name them, e.g. --site a,b or "
                          "--site @group")  # fmt: skip
    if policy != "first-fit" and detach:
        raise ConfigError(f"--policy {policy} needs this client until the job starts (it claims the attempt that "
                          "starts first): drop --detach, or use --policy first-fit")  # fmt: skip


def _say(line: str) -> None:
    click.echo(f"offload: {line}", err=True)


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def placements(ctx: click.Context, as_json: bool) -> None:
    """Jobs placed over several sites with --policy race, failover or estimate: each attempt, and the one that
    runs."""
    if ctx.invoked_subcommand is not None:
        return
    with user_errors():
        found = JobRecords().placements()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(p) for p in found], indent=2))
        return
    click.echo(f"{'PLACEMENT':<16} {'NAME':<16} {'STATE':<8}  ATTEMPTS")
    for p in found:
        attempts = ", ".join(f"{a.site}:{a.job_id or '-'} {a.state}{' (overdue)' if a.overdue else ''}"
                             for a in p.attempts)  # fmt: skip
        click.echo(f"{p.id:<16} {(p.name or '-')[:16]:<16} {p.state:<8}  {attempts}")


@placements.command("resume")
@click.argument("placement_id")
@click.option("--detach", is_flag=True, help="Finish the placement, print the job id and return.")
def placements_resume(placement_id: str, detach: bool) -> None:
    """Finish a placement whose client stopped (killed, or its machine restarted): claim the attempt that
    started first, release the others, then follow the job as 'offload run' does. Never runs it twice."""
    with user_errors():
        job = resume_placement(placement_id, say=_say)
    click.echo(f"offload: placement {placement_id} runs as job {job.id} on site '{job.site.name}'", err=True)
    if detach:
        click.echo(job.id)
        return
    sys.exit(_follow(job, cancel_on_interrupt=True))


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: the CLI then exits 128 + the signal's number, as shells report it."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__()
        self.signum = signum


def _follow(job: Job, cancel_on_interrupt: bool) -> int:
    """Show the queue state, stream the output, return the exit code for the CLI."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with user_errors():
            _show_pending(job)
            for line in job.logs(follow=True):
                click.echo(line)
            status = job.wait()
    except KeyboardInterrupt as exc:
        code = 128 + getattr(exc, "signum", signal.SIGINT)
        if not cancel_on_interrupt:
            click.echo(f"\noffload: stopped following; job {job.id} keeps running", err=True)
            return code
        click.echo(f"\noffload: interrupted; cancelling job {job.id}", err=True)
        with user_errors():
            job.cancel()
        click.echo(f"offload: job {job.id} cancelled", err=True)
        return code
    finally:
        signal.signal(signal.SIGTERM, previous)
    return _exit_code(job, status)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise _Interrupted(signum)


def _show_pending(job: Job) -> None:
    """The live queue line while the job waits; one line when it starts (a job that already ended says
    nothing here: its output comes first, then how it ended)."""
    tty = sys.stderr.isatty()
    start = time.monotonic()
    shown = ""

    def show(status: JobStatus) -> None:
        nonlocal shown
        if status.state is JobState.RUNNING:
            click.echo(("\n" if tty and shown else "") + f"offload: job {job.id} {status.describe()}"
                       + (f" on {status.node}" if status.node else ""), err=True)  # fmt: skip
        elif not status.state.is_terminal:
            text = f"offload: job {job.id} {status.describe()}"
            if tty:
                elapsed = int(time.monotonic() - start)
                click.echo(f"\r{text} [{elapsed // 60}:{elapsed % 60:02d}]\033[K", err=True, nl=False)
            elif text != shown:
                click.echo(text, err=True)
            shown = text
        elif tty and shown:
            click.echo("", err=True)

    while True:
        try:  # on a terminal, each wait of one poll interval starts by showing the state again: the clock moves
            job.wait_for_state(JobState.RUNNING, or_end=True, on_change=show,
                               timeout=job.site.config.poll_interval if tty else None)  # fmt: skip
            return
        except TimeoutError:
            continue


def _exit_code(job: Job, status: JobStatus) -> int:
    if status.state is JobState.COMPLETED:
        return 0
    click.echo(f"offload: job {job.id} ended {status.describe()}", err=True)
    if status.exit_code:
        return status.exit_code
    return 128 + status.signal if status.signal else 1


# -- jupyter -------------------------------------------------------------------------------------------


@main.command()
@click.option("--site", "site_name", help="Site profile; several, 'a,b' or '@group': the one where it starts first.")
@click.option("--gpus", type=int, default=0, show_default=True)
@click.option("--cpus", type=int)
@click.option("--memory")
@click.option("--time", "walltime", help="Walltime, HH:MM:SS.")
@click.option("--image", help="Container image with JupyterLab (default: the site's).")
@click.option("--root", help="Directory JupyterLab serves, as seen inside the container "
              "(default: <workdir>/notebooks on the site, kept between sessions).")  # fmt: skip
@click.option("--reach", "reach", multiple=True, metavar="K[=URL]", help="A service the notebooks reach (see run).")
@click.option("--no-browser", is_flag=True, help="Print the URL, do not open a browser.")
@click.option("--detach", is_flag=True, help="Submit and return at once; the server runs until its walltime.")
@click.option("--attach", "attach_job", metavar="JOB", help="Connect to a server started with --detach.")
@click.option("--policy", type=click.Choice(POLICIES), default="first-fit", show_default=True,
              help="With several sites: as for 'offload run' ('race': the server starts on whichever of the "
              "--width best sites starts it first, and only there).")  # fmt: skip
@click.option("--width", type=int, default=2, show_default=True, help="With --policy race: sites raced at once.")
def jupyter(
    site_name: str | None,
    gpus: int,
    cpus: int | None,
    memory: str | None,
    walltime: str | None,
    image: str | None,
    root: str | None,
    reach: tuple[str, ...],
    no_browser: bool,
    detach: bool,
    attach_job: str | None,
    policy: str,
    width: int,
) -> None:
    """JupyterLab on a compute node, in the site's container, reached through a local port forward.

    Ctrl-C ends the session and cancels the job; ending an --attach session leaves the server running."""
    from offload import jupyter as jl

    def progress(text: str) -> None:
        click.echo(f"offload: {text}", err=True)

    with user_errors():
        if attach_job:
            job = _resolve(attach_job, site_name)
            token = jl.saved_token(job.site, job.id)
        else:
            _check_policy(policy, site_name, detach)
            where = load_sites(site_name) if names_several(site_name) else load_site(site_name)
            try:
                job, token = jl.start(where, gpus=gpus, image=image, walltime=walltime, cpus=cpus, memory=memory,
                                      root=root, reach=_env_pairs(reach, "--reach"), policy=policy, width=width,
                                      say=_say)  # fmt: skip
            except KeyboardInterrupt as exc:  # what got in is cancelled (a race's attempts released first)
                click.echo("\noffload: interrupted before the server started; a job that got in is cancelled",
                           err=True)  # fmt: skip
                sys.exit(128 + getattr(exc, "signum", signal.SIGINT))
            click.echo(f"offload: submitted JupyterLab as job {job.id} to '{job.site.name}'", err=True)
    if detach:
        click.echo(f"offload: it runs until its walltime: connect with 'offload jupyter --attach {job.id}', end it "
                   f"with 'offload cancel {job.id}'", err=True)  # fmt: skip
        click.echo(job.id)
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    session = None
    try:
        with user_errors():
            session = jl.connect(job, token, progress)
        click.echo(session.url)
        ending = "Ctrl-C disconnects (the server keeps running)" if attach_job else "Ctrl-C ends it"
        click.echo(f"offload: JupyterLab is up (job {job.id}). {ending}", err=True)
        if not no_browser:
            session.open_browser()
        with user_errors():
            status = job.wait()
        session.close(cancel=False)
        click.echo(f"offload: the Jupyter job ended {status.describe()}", err=True)
    except KeyboardInterrupt as exc:
        keep = bool(attach_job)
        if session is not None:
            session.close(cancel=not keep)
        elif not keep:
            job.cancel()
        left = f"left job {job.id} running ('offload cancel {job.id}' ends it)" if keep else f"cancelled job {job.id}"
        click.echo(f"\noffload: {left}", err=True)
        sys.exit(0 if keep else 128 + getattr(exc, "signum", signal.SIGINT))
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command()
@click.argument("job_id", metavar="JOB")
@click.option("--site", "site_name")
def relay(job_id: str, site_name: str | None) -> None:
    """Serve a job's reach relay from here until the job ends (for jobs started with --detach)."""
    with user_errors():
        job = _resolve(job_id, site_name)
        click.echo(f"offload: relaying job {job.id}'s connections until it ends (Ctrl-C stops)", err=True)
        try:
            status = job.site.relay(job)
        except KeyboardInterrupt:
            sys.exit(130)
    click.echo(f"offload: job {job.id} ended {status.describe()}", err=True)


@main.command()
@click.argument("job_id", metavar="JOB")
@click.option("--site", "site_name")
@click.argument("command", nargs=-1)
def shell(job_id: str, site_name: str | None, command: tuple[str, ...]) -> None:
    """An interactive shell (or COMMAND) inside a running job's container, on its node."""
    with user_errors():
        job = _resolve(job_id, site_name)
        code = job.site.shell(job, list(command) or ["bash", "-l"])
    sys.exit(code)


# -- status, logs, cancel ------------------------------------------------------------------------------


async def _statuses(jobs: list[Job]) -> list[JobStatus]:
    """Asked together, so one scheduler query serves all of them."""
    import asyncio

    return list(await asyncio.gather(*(job.astatus() for job in jobs)))


def _resolve(job_id: str, site_name: str | None) -> Job:
    if site_name is None:
        found = JobRecords().sites_of(job_id)
        if len(found) > 1:
            raise ConfigError(f"job {job_id} exists on several sites ({', '.join(found)}): add --site")
        site_name = found[0] if found else None
    return load_site(site_name).job(job_id)


@main.command()
@click.argument("job_id", metavar="[JOB]", required=False)
@click.option("--site", "site_name", help="Only this site.")
@click.option("--name", help="Only jobs with this name (e.g. a Dask cluster's).")
@click.option("--limit", type=int, default=20, show_default=True)
def status(job_id: str | None, site_name: str | None, name: str | None, limit: int) -> None:
    """The state of one job, or of the jobs this machine submitted (newest first)."""
    with user_errors():
        if job_id:
            job = _resolve(job_id, site_name)
            st = job.status()
            click.echo(f"{job.id} on {job.site.name}: {st.describe()}" + (f" on {st.node}" if st.node else ""))
            return
        records = JobRecords().find(site_name, name, limit)
        by_site: dict[str, list] = {}
        for record in records:
            by_site.setdefault(record.site, []).append(record)
        states: dict[tuple[str, str], JobStatus] = {}
        for site, rows in by_site.items():
            live = [r for r in rows if not JobState(r.state).is_terminal]
            if live:
                s: Site = load_site(site)
                jobs = [s.job(r.job_id) for r in live]
                for job, st in zip(jobs, _loop.run(_statuses(jobs)), strict=True):
                    states[(site, job.id)] = st
        rows = []
        for r in records:
            st = states.get((r.site, r.job_id))
            state = st.describe() if st else JobStatus(JobState(r.state), r.reason, r.exit_code).describe()
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.submitted_at))
            rows.append((r.job_id, r.site, r.name or "-", state, when))
        _table(("JOB", "SITE", "NAME", "STATE", "SUBMITTED"), rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns as wide as their widest value: a long state or name never runs into the next column."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        click.echo("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


@main.command()
@click.argument("job_id", metavar="JOB")
@click.option("--site", "site_name")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job ends.")
def logs(job_id: str, site_name: str | None, follow: bool) -> None:
    """Print a job's output (stdout and stderr together)."""
    with user_errors():
        job = _resolve(job_id, site_name)
        if not job.ref.jobdir:
            raise ConfigError(f"job {job_id} was not submitted by offload from this machine: its log is unknown")
        try:
            for line in job.logs(follow=follow):
                click.echo(line)
        except KeyboardInterrupt:
            sys.exit(130)


@main.command()
@click.argument("job_id", metavar="JOB")
@click.argument("local", type=click.Path(exists=True, dir_okay=False, path_type=str))
@click.argument("name", required=False)
@click.option("--site", "site_name")
def put(job_id: str, local: str, name: str | None, site_name: str | None) -> None:
    """Copy the local file LOCAL into a job's directory as NAME (default: its own name); the job sees it at
    $OFFLOAD_JOB_DIR/NAME. Large files are streamed in parallel blocks, with progress."""
    with user_errors():
        job = _resolve(job_id, site_name)
        job.upload(local, name, progress=_transfer_progress(os.path.basename(local)))


@main.command()
@click.argument("job_id", metavar="JOB")
@click.argument("name")
@click.argument("local", required=False, type=click.Path(dir_okay=False, path_type=str))
@click.option("--site", "site_name")
def get(job_id: str, name: str, local: str | None, site_name: str | None) -> None:
    """Copy the file NAME of a job's directory to LOCAL (default: ./NAME), with progress."""
    with user_errors():
        job = _resolve(job_id, site_name)
        job.download(name, local or name, progress=_transfer_progress(name))


def _transfer_progress(label: str) -> Callable[[int, int], None]:
    """A progress line on stderr: redrawn in place on a terminal, a line per tenth otherwise (logs, CI)."""
    tty = sys.stderr.isatty()
    shown = {"tenth": -1, "at": 0.0}

    def report(done: int, total: int) -> None:
        tenth = 10 * done // total if total else 10
        now = time.monotonic()
        if tty and (now - shown["at"] > 0.2 or done == total):
            shown["at"] = now
            end = "\n" if done == total else ""
            percent = 100 * done // total if total else 100
            click.echo(
                f"\r{label}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB ({percent}%){end}", err=True, nl=False
            )
        elif not tty and tenth != shown["tenth"]:
            shown["tenth"] = tenth
            click.echo(f"{label}: {done / 2**20:.0f} of {total / 2**20:.0f} MiB", err=True)

    return report


@main.command()
@click.argument("job_ids", metavar="JOB...", nargs=-1)
@click.option("--site", "site_name")
@click.option("--name", help="Cancel every unfinished job with this name (e.g. what a crashed Dask client left).")
def cancel(job_ids: tuple[str, ...], site_name: str | None, name: str | None) -> None:
    """Cancel jobs, by id or by name, in one scheduler call per site."""
    with user_errors():
        if not job_ids and not name:
            raise ConfigError("give job ids, or --name NAME")
        jobs = [_resolve(j, site_name) for j in job_ids]
        if name:
            for record in JobRecords().find(site_name, name, limit=100000):
                if not JobState(record.state).is_terminal:
                    jobs.append(load_site(record.site).job(record.job_id))
        by_site: dict[str, list[Job]] = {}
        for job in jobs:
            by_site.setdefault(job.site.name, []).append(job)
        for site, site_jobs in by_site.items():
            load_site(site).cancel(site_jobs)
            click.echo(f"cancelled {len(site_jobs)} job(s) on {site}: {' '.join(j.id for j in site_jobs)}")
        if not jobs:
            click.echo("nothing to cancel")


if __name__ == "__main__":
    main()
