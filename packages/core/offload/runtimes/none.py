"""No container: the payload runs directly on the node (the ``local`` site, or sites without a runtime)."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence

from offload.errors import ConfigError
from offload.runtimes.base import ContainerContext, Runtime

log = logging.getLogger("offload")


class NoRuntime(Runtime):
    name = "none"
    binary = None  # the payload runs as it is
    cache_suffix = ""
    runs_containers = False

    def __init__(self, options: Sequence[str] = ()) -> None:
        self._warned: set[str] = set()

    def validate(self, ctx: ContainerContext) -> None:
        if ctx.image and ctx.image not in self._warned:
            self._warned.add(ctx.image)
            log.warning("this site runs no container: image %r is ignored and the command runs directly", ctx.image)
        if ctx.mounts:
            raise ConfigError("mounts need a container runtime; this site runs commands directly on the node")

    def pull_script(self, ref: str) -> str:
        raise ConfigError('this site runs no container (runtime "none"): it has no images to pull')

    def import_script(self, kind: str) -> str:
        raise ConfigError('this site runs no container (runtime "none"): it has no images to push')

    def prelude(self, ctx: ContainerContext) -> list[str]:
        return [f"cd {shlex.quote(ctx.workdir)}"] if ctx.workdir else []

    def command(self, argv: Sequence[str], ctx: ContainerContext) -> list[str]:
        return list(argv)
