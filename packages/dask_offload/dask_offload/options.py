"""What an ``OffloadCluster`` was asked for, resolved once: keywords, then Dask config, then dask-jobqueue's.

The keywords of dask-jobqueue's ``SLURMCluster`` mean the same here, so code written for it moves by changing
the import and adding ``site=`` (and ``image=``):

* ``cores`` and ``memory`` are the **job's**, split between its ``processes`` workers (each worker
  ``cores // processes`` threads and ``memory / processes`` of memory); ``job_cpu``/``job_mem`` override what
  the job asks the scheduler for;
* ``queue`` is the partition, ``job_extra_directives`` extra ``#SBATCH`` lines, ``job_directives_skip`` drops
  generated ones, ``job_script_prologue`` lines run before the workers start, ``job_script_epilogue`` lines
  after they end (in the job's container: offload's batch script has no epilogue), ``shebang`` the script's
  first line, ``log_directory`` where worker logs also appear on the site, ``job_name`` the jobs' name;
* ``worker_extra_args`` (the ``dask worker`` options that mean something here, ``--preload`` among them),
  ``death_timeout``, ``local_directory``, ``interface``, ``nanny``, ``scheduler_options``, ``name``,
  ``n_workers``, ``silence_logs`` (the log level of scheduler and workers), ``protocol`` (``tls://`` only).

GPU clusters (``gpus=N``) keep their own meaning: one worker per GPU, packed ``gpus_per_node`` to a job, each
pinned to its GPU; ``cores`` and ``memory`` are still the job's.

Precedence, key by key: the keyword, else the user's Dask config section ``offload``, else the user's
``jobqueue.slurm`` (so a site's shared ``jobqueue.yaml`` carries over), else offload's defaults (``offload.yaml``,
registered with Dask on import, so ``dask.config.get("offload")`` shows them). "The user's" means set in a yaml
file, a ``DASK_*`` variable or ``dask.config.set``: importing dask-jobqueue registers its package defaults
(``#!/usr/bin/env bash``, 30 minutes), and those are nobody's choice for an offload site.
"""

from __future__ import annotations

import logging
import math
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config
import yaml
from distributed.deploy.utils import nprocesses_nthreads

import offload


def memory_bytes(value: Any) -> int:
    """A Dask memory size in bytes, by Dask's rule (``dask.utils.parse_bytes``, which dask-jobqueue uses): ``8GB``
    is 8e9 bytes, ``8GiB`` 2**33; ``job_mem`` goes to the scheduler as it is, by SLURM's rule."""
    return offload.parse_size(str(value), binary=False)


_PACKAGE_DEFAULTS: dict[str, Any] = yaml.safe_load(Path(__file__).with_name("offload.yaml").read_text())
DEFAULTS: dict[str, Any] = _PACKAGE_DEFAULTS["offload"]
# As dask-jobqueue and distributed do with theirs: `dask.config.get("offload")` (and `dask config get offload` in
# a program that imported dask_offload) shows them; a user's value set before this import keeps its place.
if not any(registered is _PACKAGE_DEFAULTS for registered in dask.config.defaults):
    dask.config.update_defaults(_PACKAGE_DEFAULTS)
# offload key -> dask-jobqueue's SLURM config key, for the keys both have ("python" is left out: jobqueue's is a
# path on the client). jobqueue's "name" is the name of its jobs, which is offload's job_name.
JOBQUEUE = {
    "cores": "cores", "memory": "memory", "processes": "processes", "walltime": "walltime", "queue": "queue",
    "account": "account", "job_cpu": "job-cpu", "job_mem": "job-mem", "job_extra_directives": "job-extra-directives",
    "job_directives_skip": "job-directives-skip", "job_script_prologue": "job-script-prologue",
    "job_script_epilogue": "job-script-epilogue", "worker_extra_args": "worker-extra-args",
    "death_timeout": "death-timeout", "local_directory": "local-directory", "log_directory": "log-directory",
    "interface": "interface", "scheduler_options": "scheduler-options", "shebang": "shebang", "job_name": "name",
}  # fmt: skip
# dask-jobqueue keywords that cannot mean here what they mean there, and what to do instead.
REFUSED = {
    "worker_command": "offload starts the workers itself (forked from one import of distributed)",
    "shared_temp_directory": "the TLS certificates travel as secrets: there is no temporary file to share",
    "job_cls": "an OffloadCluster's jobs are offload jobs: pick the site with site=",
    "scheduler_cls": "the scheduler is distributed's own, run as a job (scheduler='site') or here ('local')",
    "config_name": "offload reads the Dask config section 'offload', then 'jobqueue.slurm'",
    "project": "use account= (dask-jobqueue renamed it too)",
}
# dask-jobqueue's deprecated names, taken as its current ones.
ALIASES = {"job_extra": "job_extra_directives", "env_extra": "job_script_prologue",
           "header_skip": "job_directives_skip", "extra": "worker_extra_args"}  # fmt: skip
# `dask worker` options a worker here honours, as distributed.Worker keywords (flags map to True).
WORKER_ARGS = {"--lifetime": "lifetime", "--lifetime-stagger": "lifetime_stagger",
               "--lifetime-restart": "lifetime_restart", "--resources": "resources", "--nthreads": "nthreads",
               "--memory-limit": "memory_limit", "--local-directory": "local_directory",
               "--death-timeout": "death_timeout", "--no-dashboard": "dashboard", "--preload": "preload",
               "--name": None}  # fmt: skip
FLAGS = {"--lifetime-restart": True, "--no-dashboard": False}


_UNSET = object()


class UserConfig:
    """What the user set in the Dask config, told apart from what packages registered as their defaults.

    Dask's config holds both: ``dask.config.update_defaults`` (which dask-jobqueue runs on import, as offload
    does) merges a package's defaults into it, and ``dask.config.defaults`` keeps what each package registered. A
    value is the user's when it comes from their yaml files or ``DASK_*`` variables (``dask.config.collect()``,
    the user's part of what ``dask.config.refresh()`` merges over the defaults), or when it is not what the
    packages registered (``dask.config.set``). One snapshot per cluster: collecting reads the yaml files.
    """

    def __init__(self) -> None:
        self._sources = dask.config.collect()
        self._defaults = dask.config.merge(*dask.config.defaults)

    def get(self, key: str) -> Any:
        """The user's value of a dotted key, or None when they set none (or set it to null)."""
        value = dask.config.get(key, None)
        if value is None or dask.config.get(key, _UNSET, config=self._sources) is not _UNSET:
            return value
        return None if value == dask.config.get(key, _UNSET, config=self._defaults) else value


def config(key: str, user: UserConfig | None = None) -> Any:
    """One option: the user's ``offload.<key>``, else the user's ``jobqueue.slurm.<key>``, else our default."""
    user = user or UserConfig()
    value = user.get(f"offload.{key}")
    if value is None and key in JOBQUEUE:
        value = user.get(f"jobqueue.slurm.{JOBQUEUE[key]}")
        if value in ([], {}):
            value = None
    return DEFAULTS.get(key) if value is None else value


@dataclass(frozen=True)
class ClusterOptions:
    """Everything the cluster's jobs are made from, with the numbers worked out."""

    given: dict[str, Any]
    gpu: bool
    per_job: int  # workers per job
    threads: int  # per worker
    worker_memory: int  # bytes, per worker
    job_cpus: int
    job_memory_mb: int
    extra: tuple[str, ...]
    skip: tuple[str, ...]
    prologue: tuple[str, ...]
    epilogue: tuple[str, ...] = ()  # shell lines run in the worker job's container after its workers end
    log_level: str | int | None = None  # silence_logs: the level of distributed's loggers, None: unchanged
    worker: dict[str, Any] = field(default_factory=dict)  # what the launcher gives each worker
    scheduler: dict[str, Any] = field(default_factory=dict)  # ... and the scheduler

    def __getitem__(self, key: str) -> Any:
        return self.given[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.given.get(key)
        return default if value is None else value


def resolve(given: dict[str, Any], unknown: dict[str, Any], gpus_per_node: int | None) -> ClusterOptions:
    """The options of a cluster from its keywords (``unknown``: anything OffloadCluster does not name)."""
    for key in list(unknown):
        if key in REFUSED:
            raise offload.ConfigError(f"OffloadCluster does not take {key}=: {REFUSED[key]}")
        if key in ALIASES:
            given.setdefault(ALIASES[key], None)
            if given[ALIASES[key]] is None:
                given[ALIASES[key]] = unknown.pop(key)
            else:
                unknown.pop(key)
    if unknown:
        raise TypeError(f"OffloadCluster got unexpected arguments {sorted(unknown)}")
    user = UserConfig()
    o = {key: (value if value is not None else config(key, user)) for key, value in given.items()}
    for key in DEFAULTS.keys() - o.keys():  # what has no keyword (scheduler_cores, startup_timeout, ...)
        o[key] = config(key, user)
    _check_protocol(o["protocol"], tls=o["tls"])
    log_level = _log_level(o["silence_logs"])
    gpus = int(o.get("gpus") or 0)
    if gpus < 0:
        raise offload.ConfigError(f"gpus cannot be negative, got {gpus}")
    if o["queue"] is not None and o["partition"] is not None and o["queue"] != o["partition"]:
        raise offload.ConfigError(f"queue={o['queue']!r} and partition={o['partition']!r} name one thing: give one")
    o["partition"] = o["partition"] or o["queue"]
    if gpus:
        if given.get("processes") not in (None, min(gpus, gpus_per_node or gpus)):
            raise offload.ConfigError(
                "gpus=N starts one worker per GPU, packed gpus_per_node to a job: processes= does not apply (for "
                "CPU workers, leave gpus out)"
            )
        per_job = min(gpus, gpus_per_node) if gpus_per_node else gpus
    elif o["processes"] is not None:
        per_job = int(o["processes"])
    elif o["cores"] is not None:
        # dask-jobqueue's rule (its Job.__init__): about sqrt(cores) workers of about as many threads each, as
        # distributed splits a machine's cores. So SLURMCluster(cores=8) and OffloadCluster(cores=8) both run
        # 4 workers of 2 threads a job.
        per_job = nprocesses_nthreads(int(o["cores"]))[0]
    else:
        per_job = 1
    if per_job < 1:
        raise offload.ConfigError(f"processes must be at least 1, got {per_job}")
    cores = int(o["cores"]) if o["cores"] is not None else per_job  # the job's; one thread per worker by default
    if cores < per_job:
        raise offload.ConfigError(
            f"cores={cores} for {per_job} worker(s) per job leaves a worker without a thread: cores is the job's "
            "(as in dask-jobqueue), split between its processes"
        )
    if o["memory"] is not None:
        memory = memory_bytes(o["memory"])
    else:
        memory = per_job * memory_bytes(config("worker_memory", user))
    job_cpus = int(o["job_cpu"]) if o["job_cpu"] is not None else cores
    job_memory_mb = (
        offload.Resources(memory=o["job_mem"]).memory_mb
        if o["job_mem"] is not None
        else max(1, math.ceil(memory / 2**20))
    )
    extra = _directives(o["job_extra_directives"])
    prologue = tuple(_lines("job_script_prologue", o["job_script_prologue"]))
    epilogue = tuple(_lines("job_script_epilogue", o["job_script_epilogue"]))
    if o["log_directory"]:
        logs = shlex.quote(str(o["log_directory"]))
        prologue += (f'mkdir -p {logs} && ln -sf "$OFFLOAD_JOB_DIR/output" {logs}/"${{SLURM_JOB_NAME:-dask}}-'
                     '${SLURM_JOB_ID:-$$}.out"',)  # fmt: skip
    worker = {
        "nthreads": max(1, cores // per_job), "memory_limit": memory // per_job,
        "resources": {"GPU": 1} if gpus else {}, "death_timeout": _seconds(o["death_timeout"]),
        "local_directory": o["local_directory"], "interface": o["interface"], "nanny": bool(o["nanny"]),
        "worker_kwargs": worker_args(o["worker_extra_args"]),
    }  # fmt: skip
    if log_level is not None:
        worker["log_level"] = log_level
    for key in ("nthreads", "memory_limit", "resources"):  # --nthreads, --memory-limit, --resources override
        if key in worker["worker_kwargs"]:
            value = worker["worker_kwargs"].pop(key)
            worker[key] = {**worker["resources"], **value} if key == "resources" else value
    scheduler_options = dict(o["scheduler_options"] or {})
    address = scheduler_options.pop("dashboard_address", None)
    if address is not None:
        scheduler_options["dashboard_port"] = int(str(address).rpartition(":")[2] or 0)
    for key in ("host", "interface"):
        if key in scheduler_options:
            raise offload.ConfigError(f"scheduler_options[{key!r}]: give interface= to the cluster (the same for all)")
    scheduler = {"idle_timeout": _seconds(o["scheduler_idle_timeout"]), "interface": o["interface"],
                 "scheduler_options": scheduler_options}  # fmt: skip
    if log_level is not None:
        scheduler["log_level"] = log_level
    return ClusterOptions(given=o, gpu=bool(gpus), per_job=per_job, threads=worker["nthreads"],
                          worker_memory=worker["memory_limit"], job_cpus=job_cpus, job_memory_mb=job_memory_mb,
                          extra=extra, skip=tuple(_lines("job_directives_skip", o["job_directives_skip"])),
                          prologue=prologue, epilogue=epilogue, log_level=log_level, worker=worker,
                          scheduler=scheduler)  # fmt: skip


def _check_protocol(protocol: Any, *, tls: bool) -> None:
    """dask-jobqueue's ``protocol``: offload's scheduler and workers talk TLS, so only ``tls://`` means anything."""
    if protocol is None:
        return
    if str(protocol).removesuffix("://") != "tls":
        raise offload.ConfigError(
            f"protocol={protocol!r}: an OffloadCluster's scheduler and workers talk TLS only, with certificates made "
            "for the cluster, because its workers share compute nodes with other users and its scheduler is reached "
            "through the site's SSH connection. Leave protocol out (or give 'tls://')."
        )
    if not tls:
        raise offload.ConfigError(f"protocol={protocol!r} and tls=False contradict each other: give one of them")


def _log_level(value: Any) -> str | int | None:
    """dask-jobqueue's ``silence_logs`` (``"error"``, ``"info"``, ...): the level of the scheduler's and the
    workers' ``distributed`` loggers. None or False: distributed's own levels, so their job logs say everything."""
    if value is None or value is False:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    name = str(value).upper()
    if name == "WARN":
        name = "WARNING"
    if not isinstance(logging.getLevelName(name), int):
        raise offload.ConfigError(
            f"silence_logs={value!r} is not a log level: give one of 'debug', 'info', 'warning', 'error', 'critical'"
        )
    return name


def _lines(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise offload.ConfigError(f"{key} is a list of strings, got {value!r}")
    return list(value)


def _directives(value: Any) -> tuple[str, ...]:
    """``job_extra_directives``: ``--gpus=1``, ``-C gpu`` or ``#SBATCH --exclusive`` as dask-jobqueue takes them."""
    options = []
    for line in _lines("job_extra_directives", value):
        option = line.strip().removeprefix("#SBATCH").strip()
        if not option.startswith("-") or "\n" in option:
            raise offload.ConfigError(f"job_extra_directives: {line!r} is not a scheduler option like '--exclusive'")
        options.append(option)
    return tuple(options)


def _seconds(value: Any) -> float | None:
    if value is None:
        return None
    from dask.utils import parse_timedelta

    return float(parse_timedelta(value))


def worker_args(args: Any) -> dict[str, Any]:
    """``dask worker`` options as Worker keywords; one that a worker here cannot honour is refused by name."""
    words = _lines("worker_extra_args", args)
    words = [part for word in words for part in (word.split("=", 1) if word.startswith("--") else [word])]
    kwargs: dict[str, Any] = {}
    i = 0
    while i < len(words):
        option = words[i]
        if option not in WORKER_ARGS:
            raise offload.ConfigError(
                f"worker_extra_args: {option!r} means nothing to offload's workers. They honour "
                f"{', '.join(sorted(WORKER_ARGS))}; for the rest, use the cluster's keywords (cores, memory, ...)"
            )
        if option == "--name":
            raise offload.ConfigError("worker_extra_args: --name: offload names workers <cluster>-<job>-<i>")
        if option in FLAGS:
            kwargs[WORKER_ARGS[option]] = FLAGS[option]
            i += 1
            continue
        if option == "--preload":  # may be given several times, as for `dask worker`
            if i + 1 >= len(words):
                raise offload.ConfigError("worker_extra_args: --preload needs a module or a .py file")
            kwargs.setdefault("preload", []).append(words[i + 1])
            i += 2
            continue
        if i + 1 >= len(words):
            raise offload.ConfigError(f"worker_extra_args: {option} needs a value")
        value: Any = words[i + 1]
        if option == "--resources":
            value = {k: float(v) for k, v in (pair.split("=") for pair in value.replace(",", " ").split())}
        elif option == "--nthreads":
            value = int(value)
        elif option in ("--death-timeout",):
            value = _seconds(value)
        kwargs[WORKER_ARGS[option]] = value
        i += 2
    return kwargs
