"""Charliecloud: ``ch-run`` on a directory or SquashFS image; the environment passes through unchanged.

``ch-run`` binds only onto directories that exist in the image, so the job's directory goes to ``/mnt/9``
(``ch-image`` creates ``/mnt/0`` to ``/mnt/9`` in every image for this) and ``OFFLOAD_JOB_DIR`` says so.
"""

from __future__ import annotations

from collections.abc import Sequence

from offload.errors import ConfigError
from offload.runtimes.base import ContainerContext, check_bind_paths, require_image

JOB_DIR = "/mnt/9"
BIND_SLOT = "/mnt/8"


class CharliecloudRuntime:
    name = "charliecloud"

    def __init__(self, options: Sequence[str] = ()) -> None:
        self.options = tuple(options)

    def validate(self, ctx: ContainerContext) -> None:
        image = require_image(self.name, ctx)
        if "://" in image:
            raise ConfigError(
                f"charliecloud runs unpacked directories or SquashFS files, not {image!r}. "
                "Pull it on the site with 'ch-image pull' and 'ch-convert', then give the path."
            )
        check_bind_paths(self.name, ctx, ":")
        for mount in ctx.mounts:
            if mount.read_only:
                raise ConfigError(
                    f"charliecloud binds are writable when the host path is; it has no read-only bind for "
                    f"{mount.source!r}. Drop ':ro', or make the directory read-only on the site."
                )

    def image_path(self, ctx: ContainerContext) -> str | None:
        return ctx.image  # always a directory or SquashFS file on the site

    def bind_target(self, source: str) -> str:
        return BIND_SLOT  # ch-run binds only onto directories the image has: /mnt/8 is offload's spare one

    def prelude(self, ctx: ContainerContext) -> list[str]:
        return []  # ch-run passes the whole environment into the container

    def command(self, argv: Sequence[str], ctx: ContainerContext) -> list[str]:
        args = ["ch-run"]
        if ctx.jobdir:
            args += ["-b", f"{ctx.jobdir}:{JOB_DIR}", f"--set-env=OFFLOAD_JOB_DIR={JOB_DIR}"]
        for mount in ctx.mounts:
            args += ["-b", f"{mount.source}:{mount.destination}"]
        if ctx.workdir or ctx.jobdir:
            args += ["-c", ctx.workdir or JOB_DIR]
        return [*args, *self.options, require_image(self.name, ctx), "--", *argv]
