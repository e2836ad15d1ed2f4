"""Apptainer and SingularityCE: ``exec --cleanenv`` with values passed as ``APPTAINERENV_*`` variables."""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from offload.errors import ConfigError
from offload.runtimes.base import ContainerContext, Runtime, check_bind_paths, require_image, unpack_rootfs


class ApptainerRuntime(Runtime):
    """``apptainer exec`` (or ``singularity exec``): ``.sif`` files, ``docker://``, ``oras://`` and sandboxes."""

    cache_suffix = ".sif"
    read_only_binds = True

    def __init__(self, name: str = "apptainer", options: Sequence[str] = ()) -> None:
        self.name = name
        self.binary = name
        self.env_prefix = "APPTAINERENV_" if name == "apptainer" else "SINGULARITYENV_"
        self.options = tuple(options)

    def validate(self, ctx: ContainerContext) -> None:
        require_image(self.name, ctx)
        check_bind_paths(self.name, ctx, ":,")

    def image_path(self, ctx: ContainerContext) -> str | None:
        image = ctx.image or ""
        return None if "://" in image else image  # a .sif file or a sandbox directory

    def pull_script(self, ref: str) -> str:
        return (f'rm -f "$OFFLOAD_DEST.tmp" && {self.binary} pull "$OFFLOAD_DEST.tmp" {shlex.quote(ref)} && '
                'mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"')  # fmt: skip

    def import_script(self, kind: str) -> str:
        if kind == "sif":
            return 'mv "$OFFLOAD_UPLOAD" "$OFFLOAD_DEST"'
        if kind != "rootfs":
            raise ConfigError(f"{self.name} imports root file systems and .sif files, not a {kind}")
        sandbox = '"$OFFLOAD_DEST.rootfs"'
        return (f'{unpack_rootfs(sandbox)} && {self.binary} build "$OFFLOAD_DEST.tmp" {sandbox}; rc=$?; '
                f'rm -rf {sandbox}; [ $rc = 0 ] && mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"')  # fmt: skip

    def cached_image(self, path: str) -> str:
        return path

    def bind_target(self, source: str) -> str:
        return source

    def prelude(self, ctx: ContainerContext) -> list[str]:
        # --cleanenv drops the host environment; <PREFIX>NAME puts NAME back inside, and keeps values off argv.
        lines = [f'export {self.env_prefix}{name}="${{{name}}}"' for name in ctx.env_names]
        lines += [f'[ -n "${{{name}+x}}" ] && export {self.env_prefix}{name}="${{{name}}}"' for name in ctx.passed]
        return lines

    def command(self, argv: Sequence[str], ctx: ContainerContext) -> list[str]:
        image = require_image(self.name, ctx)
        options = list(self.options)
        args = [self.binary, "exec", "--cleanenv"]
        if ctx.gpus and not {"--nv", "--rocm", "--nvccli"} & set(options):
            args.append("--nv")
        if ctx.jobdir:
            args += ["--bind", ctx.jobdir]
        for mount in ctx.mounts:
            spec = f"{mount.source}:{mount.destination}"
            args += ["--bind", spec + (":ro" if mount.read_only else "")]
        if ctx.workdir or ctx.jobdir:
            args += ["--pwd", ctx.workdir or ctx.jobdir]
        return [*args, *options, image, *argv]
