"""The runtime contract: turn the payload's argv into the argv that runs it in a container.

A runtime gets a :class:`ContainerContext` (image, mounts, the names of the environment variables the payload
must see, working directory, GPU count, the site's runtime options) and returns

* ``prelude(ctx)``: shell lines placed in the batch script before the command (e.g. Apptainer's
  ``APPTAINERENV_*`` exports, so values never appear on a command line), and
* ``command(argv, ctx)``: the argv that runs the payload in the container.

The job's own directory (``ctx.jobdir``) is visible inside the container at ``$OFFLOAD_JOB_DIR``, and is the
payload's working directory unless ``ctx.workdir`` says otherwise: payloads find their staged files
(``JobSpec.files``) by relative path and write results there (``Job.get``).

Every runtime must: run the payload with exactly the given argv; pass every name of ``ctx.env_names`` and the
scheduler's GPU variables (``CUDA_VISIBLE_DEVICES`` and friends) into the container; bind the mounts; start in
``ctx.workdir`` when given; return the payload's exit status. ``tests/integration/test_runtime_contract.py``
checks this for real on Charliecloud; the Apptainer and Podman paths are checked by their exact command lines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from offload.errors import ConfigError
from offload.spec import Mount

# Variables of the job's node that the payload needs to see inside the container, whatever the scheduler (each
# scheduler adds its own, ``Scheduler.job_env``, through ContainerContext.scheduler_env).
PASSTHROUGH = (
    "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
    "OFFLOAD_JOB_DIR",
    "OFFLOAD_TASK_INDEX",
    # what each copy of a multi-node job is told (torchrun, torch.distributed, jax and friends read these)
    "RANK",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class ContainerContext:
    image: str | None
    mounts: tuple[Mount, ...] = ()
    env_names: tuple[str, ...] = ()
    workdir: str | None = None
    gpus: int = 0
    jobdir: str | None = None  # the job's directory on the site, to be visible at $OFFLOAD_JOB_DIR inside
    scheduler_env: tuple[str, ...] = ()  # what the scheduler tells the job (SLURM_JOB_ID, ...), passed in too

    @property
    def passed(self) -> tuple[str, ...]:
        """Every variable a runtime passes into the container when the node's environment has it."""
        return (*PASSTHROUGH, *self.scheduler_env)


@dataclass(frozen=True)
class ContainerCommand:
    """How a site's runtime starts one container: shell lines to run first, then the command line."""

    prelude: tuple[str, ...]
    argv: tuple[str, ...]


class Runtime:
    """The base of every runtime plugin: it must give :meth:`command`, and may override the defaults of the rest
    (those of a runtime that runs images by path, binds where asked, and neither pulls nor imports)."""

    name: str = ""
    binary: str | None = None  # the program it runs on the nodes (what offload doctor looks for); None: none
    # What an image in the site's cache is called after its digest: "" (a directory), ".sif", ...
    cache_suffix: str = ""
    read_only_binds: bool = True  # whether a Mount(read_only=True) is honoured (else validate refuses it)
    runs_containers: bool = True  # False: the payload runs on the node as it is (no image, no binds)
    # Whether a bind may go where the image has no directory, whatever the image (Apptainer, Podman). Charliecloud
    # binds only onto directories an image has: it makes them where the job may write the image, no more.
    makes_mount_points: bool = True

    def validate(self, ctx: ContainerContext) -> None:
        """Raise :class:`ConfigError` for a context this runtime cannot run (before submission)."""
        require_image(self.name, ctx)

    def image_path(self, ctx: ContainerContext) -> str | None:
        """The image as a path on the site's file system, if it is one (checked before submitting), else None."""
        return None

    def pull_script(self, ref: str) -> str:
        """Shell lines, run on the login node, that pull the registry image ``ref`` (``docker://...``) into the
        cache entry ``"$OFFLOAD_DEST"``. The entry must appear whole or not at all: build ``"$OFFLOAD_DEST.tmp"``,
        then rename it. Raise :class:`ConfigError` if this runtime cannot pull."""
        raise ConfigError(f"runtime {self.name!r} cannot pull registry images: give the path of an image on the site")

    def import_script(self, kind: str) -> str:
        """Shell lines that turn the uploaded ``"$OFFLOAD_UPLOAD"`` into the cache entry ``"$OFFLOAD_DEST"`` (the
        same rules). ``kind`` is ``rootfs`` (a gzipped tar of a root file system: what ``offload image push``
        makes of directories and OCI/Docker archives) or ``sif``; raise ConfigError for a kind it cannot run."""
        raise ConfigError(f"runtime {self.name!r} cannot import pushed images: give the path of an image on the site")

    def cached_image(self, path: str) -> str:
        """What a job names to run the cache entry at ``path`` (the path itself, or a transport prefix)."""
        return path

    def bind_target(self, source: str) -> str:
        """Where to bind the site's directory ``source`` in the container when the caller has no preference
        (the same path where the runtime can create mount points; a spare existing directory where not)."""
        return source

    def prelude(self, ctx: ContainerContext) -> list[str]:
        """Shell lines placed before the command (exports, mount points). Default: none."""
        return []

    def command(self, argv: Sequence[str], ctx: ContainerContext) -> list[str]:
        """The argv that runs ``argv`` in the container."""
        raise NotImplementedError(f"the runtime plugin {self.name or type(self).__name__!r} does not give command()")


def unpack_rootfs(target: str) -> str:
    """Shell lines: the rootfs tarball ``"$OFFLOAD_UPLOAD"`` unpacked into the directory ``target`` (a shell word),
    without device files (nobody unprivileged can make them; the runtime binds the node's ``/dev``), with what
    container runtimes bind over: ``/etc/hosts``, ``/etc/resolv.conf``, and ``/mnt/0`` to ``/mnt/9``."""
    mounts = " ".join(f"{target}/mnt/{n}" for n in range(10))
    return (
        f'rm -rf {target} && mkdir -p {target} && tar -xzf "$OFFLOAD_UPLOAD" -C {target} --no-same-owner '
        f"--no-same-permissions --anchored --exclude='./dev/*' --exclude='dev/*' && mkdir -p {target}/etc "
        f"{target}/dev {mounts} && touch {target}/etc/hosts {target}/etc/resolv.conf && chmod -R u+rwX {target}"
    )


def require_image(runtime: str, ctx: ContainerContext) -> str:
    if not ctx.image:
        raise ConfigError(
            f"no container image: runtime {runtime!r} needs one. Pass image=... (CLI: --image) or set 'image' "
            "in the site profile."
        )
    return ctx.image


def check_bind_paths(runtime: str, ctx: ContainerContext, forbidden: str) -> None:
    paths = [p for mount in ctx.mounts for p in (mount.source, mount.destination)]
    if ctx.jobdir:
        paths.append(ctx.jobdir)
    for path in paths:
        bad = [c for c in forbidden if c in path]
        if bad:
            raise ConfigError(
                f"{runtime} cannot bind {path!r}: its bind syntax reserves {' '.join(repr(c) for c in bad)}. "
                "Bind a parent directory, or a symlink without those characters (or change the site's workdir)."
            )
