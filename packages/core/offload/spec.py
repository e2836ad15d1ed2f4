"""What to run: :class:`JobSpec` and the :class:`Resources` it asks for.

Specs are plain frozen values, validated when made, so bad input fails in the user's process with a clear
message before anything reaches a site. Two equal specs are the same work, which is how ``submit_many``
knows it may send them as one job array.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from offload import jobfiles
from offload.errors import ConfigError
from offload.reach_targets import targets_of
from offload.sizes import parse_size

_WALLTIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")
# what a shell accepts as a variable name: for env, secrets, reach and the adapters that build them
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_walltime(value: str | int | None) -> int | None:
    """Seconds in a SLURM time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    An int is taken as seconds.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"walltime {value!r} is not a time: use 'HH:MM:SS', e.g. '02:00:00'")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"walltime must be positive, got {value} seconds")
        return value
    match = _WALLTIME.match(str(value).strip())
    if not match:
        raise ConfigError(
            f"walltime {value!r} is not a SLURM time: use 'MM', 'HH:MM:SS' or 'D-HH:MM:SS', e.g. '02:00:00'"
        )
    days = int(match["d"] or 0)
    parts = [int(p) for p in match["rest"].split(":")]
    if match["d"] is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts += [0] * (3 - len(parts))
        hours, minutes, seconds = parts
    elif len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts
    if (match["d"] is not None or len(parts) == 3) and (minutes >= 60 or seconds >= 60):
        raise ConfigError(f"walltime {value!r}: minutes and seconds must be below 60")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total <= 0:
        raise ConfigError(f"walltime {value!r} is zero: give a positive time such as '00:30:00'")
    return total


def format_walltime(seconds: int) -> str:
    """``D-HH:MM:SS`` (or ``HH:MM:SS`` under a day), the form every SLURM version accepts."""
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    hms = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{hms}" if days else hms


def parse_memory(value: str | int | None) -> int | None:
    """Megabytes in a memory request: ``'4G'``, ``'500M'``, ``'1.5GB'``, ``'2GiB'``, or an int of megabytes.

    K, M, G, T and P are powers of 1024 with or without ``i`` (SLURM's rule: :mod:`offload.sizes`, binary), a
    bare number is megabytes, and a part of a megabyte counts as a whole one."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"memory {value!r} is not a size: use e.g. '4G' or '500M'")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"memory must be positive, got {value} MB")
        return value
    try:
        size = parse_size(str(value), unit=2**20)
    except ValueError:
        raise ConfigError(f"memory {value!r} is not a size: use e.g. '4G', '500M' or '1T'") from None
    if size <= 0:
        raise ConfigError(f"memory {value!r} is zero: give a positive size such as '1G'")
    return -(-size // 2**20)


@dataclass(frozen=True)
class Resources:
    """What a job asks the scheduler for. ``None`` means: the site's default.

    ``gpus`` counts the whole job's GPUs; ``gpus_per_node`` asks for that many on each of the ``nodes``
    instead (give one or the other, or both when they agree). ``cpus`` and ``memory`` are per copy and per
    node. With ``nodes`` above 1 (or ``tasks_per_node`` above 1) the payload runs once per node (per task),
    each copy in its own container, told its place by ``RANK``, ``NODE_RANK``, ``LOCAL_RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    """

    nodes: int = 1
    cpus: int | None = None
    memory: str | int | None = None
    gpus: int = 0
    walltime: str | int | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra: tuple[str, ...] = ()
    gpus_per_node: int | None = None
    tasks_per_node: int | None = None
    skip: tuple[str, ...] = ()  # drop the scheduler's resource directives that contain any of these

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus", "gpus", "gpus_per_node", "tasks_per_node"):
            value = getattr(self, name)
            if value is None and name in ("cpus", "gpus_per_node", "tasks_per_node"):
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"Resources.{name} must be a whole number, got {value!r}")
        if self.nodes < 1:
            raise ConfigError(f"Resources.nodes must be at least 1, got {self.nodes}")
        if self.cpus is not None and self.cpus < 1:
            raise ConfigError(f"Resources.cpus must be at least 1, got {self.cpus}")
        if self.gpus < 0:
            raise ConfigError(f"Resources.gpus cannot be negative, got {self.gpus}: use 0 for a CPU-only job")
        if self.gpus_per_node is not None and self.gpus_per_node < 0:
            raise ConfigError(f"Resources.gpus_per_node cannot be negative, got {self.gpus_per_node}")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ConfigError(f"Resources.tasks_per_node must be at least 1, got {self.tasks_per_node}")
        if self.gpus_per_node is not None and self.gpus and self.gpus != self.gpus_per_node * self.nodes:
            raise ConfigError(
                f"Resources(gpus={self.gpus}, gpus_per_node={self.gpus_per_node}, nodes={self.nodes}) disagree: "
                f"{self.gpus_per_node} per node on {self.nodes} node(s) is {self.gpus_per_node * self.nodes} GPUs. "
                "Give gpus (for the whole job) or gpus_per_node, not both"
            )
        parse_walltime(self.walltime)
        parse_memory(self.memory)
        if isinstance(self.extra, str):
            raise ConfigError("Resources.extra is a list of scheduler options, e.g. ['--exclusive']")
        object.__setattr__(self, "extra", tuple(self.extra))
        if isinstance(self.skip, str) or not all(isinstance(s, str) and s for s in self.skip):
            raise ConfigError("Resources.skip is a list of strings, e.g. ['--mem'] (directives holding one go)")
        object.__setattr__(self, "skip", tuple(self.skip))
        for option in self.extra:
            if not isinstance(option, str) or not option.startswith("-"):
                raise ConfigError(f"Resources.extra holds scheduler options like '--exclusive', got {option!r}")

    @property
    def total_gpus(self) -> int:
        """The job's GPUs over all its nodes."""
        return self.gpus_per_node * self.nodes if self.gpus_per_node is not None else self.gpus

    @property
    def copies(self) -> int:
        """How many copies of the payload run: one per task on every node (1: the batch script runs it)."""
        return self.nodes * (self.tasks_per_node or 1)

    @property
    def walltime_seconds(self) -> int | None:
        return parse_walltime(self.walltime)

    @property
    def memory_mb(self) -> int | None:
        return parse_memory(self.memory)


@dataclass(frozen=True)
class Mount:
    """A host path on the site bound into the container at ``target`` (the same path when not given)."""

    source: str
    target: str | None = None
    read_only: bool = False

    @classmethod
    def parse(cls, text: str) -> Mount:
        """``SRC``, ``SRC:DST`` or ``SRC:DST:ro`` as on the command line."""
        parts = text.split(":")
        if len(parts) == 1:
            return cls(parts[0])
        if len(parts) == 2:
            return cls(parts[0], parts[1])
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return cls(parts[0], parts[1], parts[2] == "ro")
        raise ConfigError(f"mount {text!r} is not SRC[:DST[:ro]]; a path with ':' needs a Mount(...) object")

    def __post_init__(self) -> None:
        if not self.source or not self.source.startswith("/"):
            raise ConfigError(f"mount source {self.source!r} must be an absolute path on the site")
        if self.target is not None and not self.target.startswith("/"):
            raise ConfigError(f"mount target {self.target!r} must be an absolute path in the container")

    @property
    def destination(self) -> str:
        return self.target or self.source


@dataclass(frozen=True)
class JobSpec:
    """One piece of containerised work: a command, the image it runs in, and what it needs.

    ``env`` is written into the batch script; ``secrets`` never are: they travel in a 0600 file in the job's
    0700 directory and reach only the payload's environment. ``files`` are staged into the job's directory
    (``$OFFLOAD_JOB_DIR/<name>`` inside the container) in the same round trip as the submission; a name ending
    in ``/`` holds a tar archive (see :func:`offload.spec.archive`) unpacked into that directory. ``reach``
    names services on the user's side (``{"MLFLOW_TRACKING_URI": "https://mlflow.example.org"}``): the payload
    gets the variable pointing at a relay on its node's loopback, which offload carries back over its own
    connection, so the job reaches them although compute nodes have no outbound network. ``relay`` runs that
    relay even without ``reach``, so the client can reach a service the job serves on its node's loopback only
    (:meth:`Site.forward_job`), out of reach of other users of a shared node. ``prologue`` lines run in the
    batch script before the payload, after the site's ``setup`` lines (``module load ...``); ``shebang``
    replaces the site's first line of the script for this job. ``container=False`` runs ``command`` on the node
    itself, outside the site's runtime: for a driver that starts containers itself (the several containers of a
    Kubernetes pod, in offload's interLink plugin).
    """

    command: tuple[str, ...]
    image: str | None = None
    resources: Resources = field(default_factory=Resources)
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: Mapping[str, str] = field(default_factory=dict, repr=False)
    mounts: tuple[Mount, ...] = ()
    workdir: str | None = None
    name: str | None = None
    files: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    reach: Mapping[str, str] = field(default_factory=dict)
    relay: bool = False
    prologue: tuple[str, ...] = ()
    shebang: str | None = None
    container: bool = True

    def __post_init__(self) -> None:
        command = self.command
        if isinstance(command, str):
            raise ConfigError(
                "JobSpec.command is an argv list, e.g. ['python3', 'train.py']; "
                "for a shell line use ['bash', '-c', '...']"
            )
        command = tuple(command)
        if not command or not all(isinstance(a, str) for a in command):
            raise ConfigError(f"JobSpec.command must be a non-empty list of strings, got {self.command!r}")
        object.__setattr__(self, "command", command)
        if not isinstance(self.resources, Resources):
            raise ConfigError("JobSpec.resources must be an offload.Resources(...)")
        for label, mapping in (("env", self.env), ("secrets", self.secrets)):
            frozen = _frozen_env(label, mapping)
            object.__setattr__(self, label, frozen)
        reach = _frozen_env("reach", self.reach)
        object.__setattr__(self, "reach", reach)
        for one, other in (("env", "secrets"), ("env", "reach"), ("secrets", "reach")):
            overlap = set(getattr(self, one)) & set(getattr(self, other))
            if overlap:
                raise ConfigError(f"{sorted(overlap)} given both as {one} and as {other}: keep each name in one place")
        if reach:
            targets_of(dict(reach))  # a bad URL fails here, before anything is submitted
        if isinstance(self.prologue, str) or not all(isinstance(line, str) for line in self.prologue):
            raise ConfigError("JobSpec.prologue is a list of shell lines, e.g. ['module load cuda']")
        object.__setattr__(self, "prologue", tuple(self.prologue))
        if self.shebang is not None and (not self.shebang.startswith("#!") or "\n" in self.shebang):
            raise ConfigError(f"JobSpec.shebang {self.shebang!r} must be one line starting with '#!'")
        if (reach or self.relay) and self.resources.copies > 1:
            raise ConfigError(
                "reach serves jobs on one node for now; a job on several nodes (or with several tasks per "
                "node) cannot have it yet: run the service's client on the first copy only, or ask on one node"
            )
        mounts = tuple(Mount.parse(m) if isinstance(m, str) else m for m in self.mounts)
        if not all(isinstance(m, Mount) for m in mounts):
            raise ConfigError("JobSpec.mounts holds 'SRC[:DST[:ro]]' strings or offload.Mount objects")
        object.__setattr__(self, "mounts", mounts)
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise ConfigError(f"JobSpec.workdir {self.workdir!r} must be an absolute path in the container")
        files = dict(self.files)
        for file_name, data in files.items():
            plain = file_name.removesuffix("/")  # "data/": a tar archive unpacked into the directory data
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$", plain) or plain in RESERVED_FILES:
                raise ConfigError(f"JobSpec.files: {file_name!r} is not a plain file name (or is one of offload's own)")
            if not isinstance(data, bytes):
                raise ConfigError(f"JobSpec.files[{file_name!r}] must be bytes")
        if sum(len(d) for d in files.values()) > MAX_FILES_BYTES:
            raise ConfigError(
                f"JobSpec.files hold more than {MAX_FILES_BYTES // 2**20} MiB; put large inputs on the site's "
                "file system and mount them instead"
            )
        object.__setattr__(self, "files", _FrozenFiles(files))
        if self.name is not None and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", self.name):
            raise ConfigError(
                f"job name {self.name!r}: use letters, digits, '.', '_' and '-' (at most 64), starting with a "
                "letter or digit"
            )

    def __hash__(self) -> int:
        files = tuple(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in self.files.items()))
        return hash((self.command, self.image, self.resources, tuple(sorted(self.env.items())), self.mounts, files,
                     tuple(sorted(self.reach.items())), self.relay, self.prologue, self.shebang,
                     self.container))  # fmt: skip


def archive(path: str | os.PathLike[str]) -> bytes:
    """A local directory as a gzipped tar archive, for ``JobSpec(files={"name/": archive(path)})``: its files
    travel in the submission's one round trip however many there are, and are unpacked into the job's
    directory before it starts."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(path, arcname=".")
    return buffer.getvalue()


RESERVED_FILES = jobfiles.RESERVED  # offload's own files in a job's directory: never staged over
# Variables the batch script itself sets; a spec may not give them (its own lower-case ``offload_*`` too).
RESERVED_ENV = frozenset({"OFFLOAD_JOB_DIR", "OFFLOAD_TASK_INDEX", "OFFLOAD_REACH"})
MAX_FILES_BYTES = 16 * 2**20  # files travel base64 in the submission's one round trip


class _FrozenEnv(dict):
    """A dict that cannot change after the spec is made, so equal specs stay equal."""

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a JobSpec's env and secrets are read-only; make a new JobSpec")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


class _FrozenFiles(dict):
    """Read-only, like :class:`_FrozenEnv`."""

    def _readonly(self, *args: object, **kwargs: object) -> None:
        raise TypeError("a JobSpec's files are read-only; make a new JobSpec")

    __setitem__ = __delitem__ = update = pop = popitem = clear = setdefault = _readonly  # type: ignore[assignment]


def _frozen_env(label: str, mapping: Mapping[str, str] | Sequence[tuple[str, str]]) -> _FrozenEnv:
    items = dict(mapping)
    for key, value in items.items():
        if not isinstance(key, str) or not ENV_NAME.match(key):
            raise ConfigError(f"{label} name {key!r} is not a valid environment variable name")
        if key in RESERVED_ENV or key.startswith("offload_"):
            raise ConfigError(f"{label} name {key!r} is one offload sets itself in the batch script: use another")
        if not isinstance(value, str):
            raise ConfigError(f"{label}[{key!r}] must be a string, got {type(value).__name__}")
        if "\0" in value:
            raise ConfigError(f"{label}[{key!r}] contains a NUL byte, which no environment can hold")
    return _FrozenEnv(items)


def spec_to_json(spec: JobSpec) -> str | None:
    """``spec`` as JSON, for a record a later process may submit again (a placement's next attempt, after its
    client restarted); None when it holds what offload never writes down: secrets, or services to reach (their
    URLs may carry credentials)."""
    if spec.secrets or spec.reach:
        return None
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name not in ("secrets", "reach")}
    fields["resources"] = dataclasses.asdict(spec.resources)
    fields["mounts"] = [dataclasses.asdict(m) for m in spec.mounts]
    fields["env"] = dict(spec.env)
    fields["files"] = {name: base64.b64encode(data).decode() for name, data in spec.files.items()}
    return json.dumps(fields)


def spec_from_json(text: str) -> JobSpec:
    """The spec :func:`spec_to_json` wrote."""
    fields = json.loads(text)
    fields["resources"] = Resources(**{k: tuple(v) if isinstance(v, list) else v
                                       for k, v in fields["resources"].items()})  # fmt: skip
    fields["mounts"] = tuple(Mount(**m) for m in fields["mounts"])
    fields["files"] = {name: base64.b64decode(data) for name, data in fields["files"].items()}
    return JobSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
