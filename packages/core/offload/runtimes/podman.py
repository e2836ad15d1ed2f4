"""Podman (for sites that offer it): host network, CDI GPUs, values passed by name with ``-e NAME``.

offload's argv is the whole command, as ``apptainer exec`` and ``ch-run`` run it: the image's ENTRYPOINT is
replaced (``--entrypoint``), never put in front of it (what ``podman run IMAGE ARGV`` would do).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence

from offload.errors import ConfigError
from offload.runtimes.base import ContainerContext, Runtime, check_bind_paths, require_image


class PodmanRuntime(Runtime):
    name = "podman"
    binary = "podman"
    cache_suffix = ".oci.tar"  # an OCI archive on the shared file system: nodes need no registry nor store
    read_only_binds = True

    def __init__(self, options: Sequence[str] = ()) -> None:
        self.options = tuple(options)

    def validate(self, ctx: ContainerContext) -> None:
        require_image(self.name, ctx)
        check_bind_paths(self.name, ctx, ":,")

    def image_path(self, ctx: ContainerContext) -> str | None:
        return None  # names of podman's own store or of a registry

    def pull_script(self, ref: str) -> str:
        name = shlex.quote(ref.split("://", 1)[-1])
        return (f'podman pull {name} && rm -f "$OFFLOAD_DEST.tmp" && podman save --format oci-archive -o '
                f'"$OFFLOAD_DEST.tmp" {name} && mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"')  # fmt: skip

    def import_script(self, kind: str) -> str:
        if kind != "rootfs":
            raise ConfigError(f"podman imports root file systems, not a {kind}")
        return (
            'name="localhost/offload-import-$$"; podman import "$OFFLOAD_UPLOAD" "$name" && rm -f "$OFFLOAD_DEST.tmp" '
            '&& podman save --format oci-archive -o "$OFFLOAD_DEST.tmp" "$name"; rc=$?; podman rmi "$name" >/dev/null '
            '2>&1; [ $rc = 0 ] && mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"'
        )

    def cached_image(self, path: str) -> str:
        return "oci-archive:" + path

    def bind_target(self, source: str) -> str:
        return source

    def prelude(self, ctx: ContainerContext) -> list[str]:
        return []

    def command(self, argv: Sequence[str], ctx: ContainerContext) -> list[str]:
        # Host networking: Dask workers and Jupyter must be reachable on the node's own address.
        args = ["podman", "run", "--rm", "--network=host", "--userns=keep-id"]
        if ctx.gpus:
            args += ["--device", "nvidia.com/gpu=all"]
        if ctx.jobdir:
            args += ["-v", f"{ctx.jobdir}:{ctx.jobdir}"]
        for mount in ctx.mounts:
            args += ["-v", f"{mount.source}:{mount.destination}" + (":ro" if mount.read_only else "")]
        if ctx.workdir or ctx.jobdir:
            args += ["-w", ctx.workdir or ctx.jobdir]
        for name in (*ctx.env_names, *ctx.passed):
            args += ["-e", name]  # a bare name copies the value from the job's environment, if set
        entrypoint = "--entrypoint=" + json.dumps(list(argv[:1]))  # JSON: one program, whatever its characters
        return [*args, *self.options, entrypoint, require_image(self.name, ctx), *argv[1:]]
