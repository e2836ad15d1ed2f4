"""Charliecloud: ``ch-run`` on a directory or SquashFS image; the environment passes through unchanged.

``ch-run`` binds only onto directories that exist in the image, so the job's directory goes to ``/mnt/9``
(``ch-image`` creates ``/mnt/0`` to ``/mnt/9`` in every image for this) and ``OFFLOAD_JOB_DIR`` says so. A
mount whose destination the image lacks gets its directory made in the image first, where the job's user may
write there (images of offload's cache are the user's); in an image nobody may change (a site's shared image)
the job stops before ``ch-run`` with what to do, not with ch-run's "can't mkdir: Read-only file system".
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from offload.errors import ConfigError
from offload.runtimes.base import ContainerContext, Runtime, check_bind_paths, require_image, unpack_rootfs

JOB_DIR = "/mnt/9"
BIND_SLOT = "/mnt/8"


class CharliecloudRuntime(Runtime):
    name = "charliecloud"
    binary = "ch-run"
    cache_suffix = ""  # a directory: ch-run starts it at once, without FUSE or a conversion on the node
    read_only_binds = False  # ch-run's binds are writable where the host directory is
    makes_mount_points = False  # see prelude(): only in an image the job may write

    def __init__(self, options: Sequence[str] = ()) -> None:
        self.options = tuple(options)

    def validate(self, ctx: ContainerContext) -> None:
        image = require_image(self.name, ctx)
        if "://" in image:
            raise ConfigError(
                f'charliecloud runs directories and SquashFS files, not {image!r}, and with pull = "node" in the '
                'profile nothing pulls it. Leave pull = "login" (the default) for offload to pull it once on the '
                "login node, or give the path of an image on the site."
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

    def pull_script(self, ref: str) -> str:
        name = ref.split("://", 1)[-1]
        # ch-image's own storage only for this pull, removed after: the cache is offload's, and prune frees all
        return (
            'export CH_IMAGE_STORAGE="$OFFLOAD_DEST.ch-image"; rm -rf "$CH_IMAGE_STORAGE" "$OFFLOAD_DEST.tmp"; '
            f"ch-image --no-cache pull {shlex.quote(name)} offload-pull && ch-convert -i ch-image -o dir offload-pull "
            '"$OFFLOAD_DEST.tmp"; rc=$?; rm -rf "$CH_IMAGE_STORAGE"; '
            '[ $rc = 0 ] && mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"'
        )

    def import_script(self, kind: str) -> str:
        if kind != "rootfs":
            raise ConfigError(
                f"charliecloud runs directories and SquashFS files, not a {kind}: push a root file system (a "
                "directory, a tarball, or a 'docker save'/OCI archive)"
            )
        return f'{unpack_rootfs(chr(34) + "$OFFLOAD_DEST.tmp" + chr(34))} && mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"'

    def bind_target(self, source: str) -> str:
        return BIND_SLOT  # ch-run binds only onto directories the image has: /mnt/8 is offload's spare one

    def prelude(self, ctx: ContainerContext) -> list[str]:
        """The mount points the image lacks, made (ch-run passes the whole environment: nothing else to do)."""
        image = require_image(self.name, ctx).rstrip("/")
        lines = []
        for mount in ctx.mounts:
            point = shlex.quote(image + mount.destination)
            why = (f"offload: the image {image} has no directory {mount.destination} to mount {mount.source} on, "
                   "and this job may not make one there (Charliecloud binds only onto directories an image has). "
                   "Mount it on a directory the image has (under /mnt or /tmp), or run an image of offload's cache "
                   "(pulled or pushed), where the job makes it")  # fmt: skip
            lines.append(f"if [ -d {shlex.quote(image)} ] && [ ! -d {point} ]; then mkdir -p {point} 2>/dev/null || "
                         f"{{ echo {shlex.quote(why)} >&2; exit 1; }}; fi")  # fmt: skip
        return lines

    def command(self, argv: Sequence[str], ctx: ContainerContext) -> list[str]:
        args = ["ch-run"]
        if ctx.jobdir:
            args += ["-b", f"{ctx.jobdir}:{JOB_DIR}", f"--set-env=OFFLOAD_JOB_DIR={JOB_DIR}"]
        for mount in ctx.mounts:
            args += ["-b", f"{mount.source}:{mount.destination}"]
        if ctx.workdir or ctx.jobdir:
            args += ["-c", ctx.workdir or JOB_DIR]
        return [*args, *self.options, require_image(self.name, ctx), "--", *argv]
