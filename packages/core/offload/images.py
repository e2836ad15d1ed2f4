"""Container images the way HPC sites need them: pulled once on the login node, or pushed from here.

Compute nodes usually cannot reach a registry, and sixteen jobs pulling one image at once into one cache (each
on its node, each eating its walltime) is how sites get hurt. So a registry image (``docker://...``) is pulled
*once*, on the login node, into the site's image cache ``<workdir>/images``, converted to what the runtime runs
best (Charliecloud: a directory; Apptainer: a ``.sif``; Podman: its store), keyed by the registry's digest;
jobs then run the cached image. Many jobs (and many clients: a lock on the site) asking for a missing image
cause one pull. A profile with ``pull = "node"`` leaves pulls to the runtime on the node, for sites whose nodes
do reach registries.

An image made here (a directory, a rootfs tarball, a ``docker save`` or OCI archive, a ``.sif``) is pushed
over the site's SSH connection (SFTP, in large parallel blocks, with progress) and converted there; then
``--image NAME`` names it in any job, JupyterLab, Dask cluster, Airflow task or hub profile.

The login node's side of the cache is :mod:`offload.images_site` (standard library only).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import inspect
import io
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from offload import _loop, images_site
from offload.errors import ConfigError, ImageError

if TYPE_CHECKING:
    from offload.context import SiteContext
    from offload.spec import JobSpec

T = TypeVar("T")
log = logging.getLogger("offload.images")


SOURCE = inspect.getsource(images_site)
# A pushed image's name, as `docker tag` names go (OCI's reference: path components, then an optional tag):
# `model.v2`, `me/train:1`, `group/sub/name:tag`. Never a scheme, an absolute path or a `..` component.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:[A-Za-z0-9_][A-Za-z0-9._-]{0,127})?$")
_NAME_MAX = 255
# A resolved registry image is trusted for this long in one process (then its tag is asked for again): a
# submission of 1000 jobs, or a Dask cluster scaling up, asks the registry once, not per job.
RESOLVED_FOR = 300.0
Progress = Callable[[str], None]
_NOT_CACHED = "not in the site's cache yet: making it once on the login node (later jobs run the cached copy)"
_MADE = "offload-image-"  # the prefix of the temporary files a push makes (and deletes)
_LINK_HOPS = 40  # symbolic links followed on one path of an image before it is called a loop (Linux's limit)


@dataclass(frozen=True)
class CachedImage:
    """An image in a site's cache: the ref it is known by, its digest, its path on the site, its size in
    bytes, when it was pulled and last used (seconds since the epoch), and what it runs when given no command
    (its config's ENTRYPOINT and CMD: empty where it has none, or where the cache does not know them)."""

    ref: str
    digest: str
    path: str
    size: int
    pulled: float
    used: float
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """What to give as ``image=`` (``--image``): the pushed name, or the registry ref."""
        return self.ref.removeprefix("local://")


def is_pull(image: str | None) -> bool:
    """A registry image the cache pulls (``docker://...``)."""
    return bool(image) and image.startswith("docker://")


def is_pushed_name(image: str | None) -> bool:
    """A name like ``docker tag``'s (``train``, ``me/train:1``; no scheme, not a path from ``/``): perhaps an
    image pushed with ``offload image push --name``."""
    return bool(image) and len(image) <= _NAME_MAX and _NAME.match(image) is not None


def _pushed_ref(name: str) -> str:
    return f"local://{name}"


def checked_digest(value: object, source: str) -> str:
    """``value`` if it is a sha256 digest, else :class:`ImageError` naming ``source``: the same check as the
    login node's (:func:`offload.images_site.check_digest`), on this side, for every digest that comes from
    elsewhere (the login node, an archive's index) before it names a file or goes into a command."""
    return _site_check(images_site.check_digest, value, source)


def _site_check(check: Callable[[Any, str], T], value: object, source: str) -> T:
    """One of the login node's checks of data from elsewhere, here: :class:`ImageError` where it fails."""
    try:
        return check(value, source)
    except images_site.Failed as exc:
        raise ImageError(str(exc)) from None


def _private_mkdir(path: str) -> list[str]:
    """The command making the site's directory ``path`` with every missing parent 0700 (the first push makes the
    workdir itself): ``mkdir -p -m 700`` sets the mode of the last component only, a umask of 077 that of all."""
    return ["sh", "-c", 'umask 077 && mkdir -p -- "$0" && chmod 700 -- "$0"', path]


class Images:
    """The image cache of one site, on its login node under ``<workdir>/images``: ``site.images``.

    Every method has an ``a``-prefixed async form. Methods that may take minutes (``pull``, ``push``) report
    how they go to ``progress`` (default: the ``offload.images`` logger).
    """

    def __init__(self, ctx: SiteContext) -> None:
        self._ctx = ctx
        self._resolving: dict[str, tuple[float, asyncio.Future[CachedImage]]] = {}

    async def _cache(self) -> str:
        return f"{await self._ctx.workdir()}/images"

    async def _helper(self, mode: str, *args: str, progress: Progress | None = None) -> list[CachedImage]:
        """Run one mode of :mod:`offload.images_site` on the login node: the records it prints."""
        lines = await self._run_helper(mode, *args, progress=progress)
        return [_image(json.loads(line[15:])) for line in lines if line.startswith("offload-record ")]

    async def _run_helper(self, mode: str, *args: str, progress: Progress | None = None) -> list[str]:
        """Run one mode of :mod:`offload.images_site` on the login node: the lines it prints, or
        :class:`ImageError` with its own words. With ``progress``, its output is passed on a line at a time as
        it comes (a pull may take minutes); without, it is a quick command, bounded by the command timeout."""
        argv = ["sh", "-c", 'exec python3 -c "$0" "$@"', SOURCE, mode, await self._cache(), *args]
        if progress is None:
            result = await self._ctx.transport.run(argv, check=False)
            lines, code = (result.stdout + "\n" + result.stderr).splitlines(), result.exit_status
        else:
            lines, code = await self._stream(argv, progress)
        if code != 0:
            errors = [line[14:] for line in lines if line.startswith("offload-error ")]
            said = "\n".join(line for line in lines[-25:] if line.strip() and not line.startswith("offload-"))
            if errors:
                raise ImageError(errors[-1] + (f":\n{said}" if said else ""))
            raise ImageError(f"the image cache on the login node failed (exit status {code}):\n{said}")
        return lines

    async def _stream(self, argv: list[str], progress: Progress) -> tuple[list[str], int]:
        process = await self._ctx.transport.start(argv)
        lines: list[str] = []
        pending = b""
        try:
            while chunk := await process.stdout.read(65536):
                pending += chunk.replace(b"\r", b"\n")  # a progress bar's redraws become lines
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = raw.decode("utf-8", "replace").rstrip()
                    if line:
                        lines.append(line)
                        if line == "offload-building":
                            progress(_NOT_CACHED)
                        elif not line.startswith("offload-"):
                            progress(line)
            if pending.strip():
                lines.append(pending.decode("utf-8", "replace").rstrip())
            return lines, await process.wait()
        finally:
            process.close()

    # -- reading the cache ----------------------------------------------------------------------------

    @_loop.on_loop
    async def alist(self) -> list[CachedImage]:
        """The cached images, the most recently used first."""
        return sorted(await self._helper("list"), key=lambda image: image.used, reverse=True)

    list = _loop.blocking(alist)

    @_loop.on_loop
    async def aremote_digest(self, ref: str) -> tuple[str, int]:
        """What the registry has for ``ref`` now, asked from the login node: its digest and its download size
        in bytes (without pulling it)."""
        for line in await self._run_helper("digest", ref):
            if line.startswith("offload-digest "):
                found, size = line.split()[1:3]
                return checked_digest(found, f"the login node of site '{self._ctx.name}'"), int(size)
        raise ImageError(f"the login node gave no digest for {ref}")

    # -- pulling --------------------------------------------------------------------------------------

    @_loop.on_loop
    async def apull(self, ref: str, progress: Progress | None = None) -> CachedImage:
        """``ref`` (``docker://...``) in the cache: the registry is asked for the tag's digest now, and the image
        is pulled and converted on the login node unless that digest is there already. Several callers (in this
        process, or on other machines: a lock on the site) asking at once cause one pull."""
        if not is_pull(ref):
            raise ConfigError(f"{ref!r} is not a registry image: give docker://HOST/REPO:TAG")
        progress = progress or _log_progress
        script = self._ctx.runtime.pull_script(ref)
        try:
            found = await self._helper("ensure", ref, self._ctx.runtime.cache_suffix, script,
                                       progress=lambda line: progress(f"{ref}: {line}"))  # fmt: skip
        except ImageError as exc:
            hint = ""
            if "cannot reach the registry" in str(exc):
                hint = (". Where the login node cannot reach the registry either, bring the image from here: "
                        "offload image push PATH --name NAME")  # fmt: skip
            raise ImageError(f"image {ref} on site '{self._ctx.name}': {exc}{hint}") from None
        if not found:
            raise ImageError(f"image {ref}: the cache on the login node gave no record of it")
        self._resolving[ref] = (time.monotonic(), _done(found[-1]))
        return found[-1]

    pull = _loop.blocking(apull)

    # -- what a job runs ------------------------------------------------------------------------------

    @_loop.on_loop
    async def aresolve(self, image: str, progress: Progress | None = None) -> str:
        """The image a job should name: a registry image (where the site pulls on its login node) is pulled
        once and run from the cache; a name given to ``offload image push`` is that image's cache path; any
        other image (a path on the site, or a ref the runtime pulls itself) is left as it is."""
        cached = await self.acached(image, progress)
        return image if cached is None else self._ctx.runtime.cached_image(cached.path)

    resolve = _loop.blocking(aresolve)

    def through_cache(self, image: str) -> bool:
        """Whether a job runs ``image`` from this site's cache: a registry image the site pulls on its login node
        (``pull = "login"``), or a name given to ``offload image push``. Its path, ENTRYPOINT and CMD are known
        only once it is there (:meth:`acached`); any other image is run as it is named."""
        return (is_pull(image) and self._ctx.config.pull == "login") or is_pushed_name(image)

    @_loop.on_loop
    async def acached(self, image: str, progress: Progress | None = None) -> CachedImage | None:
        """The cache's record of ``image`` where a job runs it from the cache (:meth:`aresolve`): a registry image
        the site pulls on its login node (pulled now if need be) or a pushed name; None for any other image (a
        path on the site, a ref the runtime pulls itself, a name of its own store), whose config offload does not
        know. It is :meth:`aresolve`'s own lookup: asking both for one image pulls or finds it once."""
        if not self.through_cache(image):
            return None
        pull = is_pull(image)
        now = time.monotonic()
        for old in [k for k, (t, f) in self._resolving.items() if f.done() and now - t >= RESOLVED_FOR]:
            del self._resolving[old]  # a long-lived server resolves many images over months: keep the fresh ones
        when, running = self._resolving.get(image, (0.0, None))
        fresh = running is not None and (not running.done() or time.monotonic() - when < RESOLVED_FOR)
        if not fresh or (running.done() and running.exception() is not None):
            running = asyncio.ensure_future(self.apull(image, progress) if pull else self._find_pushed(image))
            self._resolving[image] = (time.monotonic(), running)
        cached = await asyncio.shield(running)
        # a bare name that is no pushed image: a name of the runtime's own store, or a mistake
        if cached is None and self._ctx.runtime.image_path(_just_image(image)) is not None:
            raise ImageError(
                f"no image named {image!r} in the cache of site '{self._ctx.name}': push it with 'offload image "
                f"push PATH --name {image} --site {self._ctx.name}' ('offload image ls' lists what is there)"
            )
        return cached

    cached = _loop.blocking(acached)

    async def _find_pushed(self, name: str) -> CachedImage | None:
        try:
            found = await self._helper("find", _pushed_ref(name))
        except ImageError as exc:
            if str(exc).startswith("missing"):
                return None
            raise
        return found[-1] if found else None

    @_loop.on_loop
    async def aresolve_specs(self, specs: list[JobSpec], progress: Progress | None = None) -> list[JobSpec]:
        """``specs`` with each image resolved (:meth:`aresolve`), the site's default image included: each
        distinct image once, all at the same time."""
        images = {spec.image or self._ctx.config.image for spec in specs if spec.container} - {None, ""}
        wanted = [image for image in images if is_pull(image) or is_pushed_name(image)]
        if not wanted:
            return specs
        resolved = dict(zip(wanted, await asyncio.gather(*(self.aresolve(i, progress) for i in wanted)), strict=True))
        return [replace(spec, image=resolved.get(spec.image or self._ctx.config.image or "", spec.image))
                if spec.container else spec for spec in specs]  # fmt: skip

    # -- pushing ----------------------------------------------------------------------------------------

    @_loop.on_loop
    async def apush(self, path: str | os.PathLike[str], name: str, progress: Progress | None = None) -> CachedImage:
        """Send a local image to the site under ``name`` (then ``image=name``, ``--image NAME`` runs it): a
        directory, a rootfs tarball, a ``docker save`` or OCI archive, or a ``.sif``. It goes over the site's
        connection in large parallel blocks, resumes where an interrupted push of the same content stopped, and
        is converted on the login node to what the runtime runs best. Content that is there already is not
        sent again."""
        if not isinstance(name, str) or not is_pushed_name(name):
            raise ConfigError(
                f"image name {name!r}: name it as for `docker tag`: letters, digits, '.', '_' and '-' in parts "
                "joined by '/', then an optional ':tag' (e.g. me/train:1), at most 255 characters"
            )
        progress = progress or _log_progress
        local = Path(path)
        runtime = self._ctx.runtime
        loop = asyncio.get_running_loop()
        progress(f"{name}: preparing {local}")
        kind, upload, run = await loop.run_in_executor(None, _prepare, local)
        made = upload.name.startswith(_MADE)
        script = runtime.import_script(kind)  # refuses a kind the runtime cannot run, before the upload
        try:
            digest = checked_digest("sha256:" + await loop.run_in_executor(None, _sha256, upload), "this machine")
            cache = await self._cache()
            known = {image.digest for image in await self.alist()}  # the helper makes the cache, 0700
            remote = ""
            if digest not in known:
                await self._ctx.transport.run(_private_mkdir(f"{cache}/uploads"))
                remote = f"{cache}/uploads/{digest[7:]}.{'sif' if kind == 'sif' else 'tar.gz'}"
                size = upload.stat().st_size
                await self._ctx.transport.put(str(upload), remote, resume=True,
                                               progress=_upload_progress(progress, name, size))  # fmt: skip
            else:
                progress(f"{name}: the site has this image already ({digest[:19]})")
        finally:
            if made:
                upload.unlink(missing_ok=True)
        found = await self._helper("import", _pushed_ref(name), digest, runtime.cache_suffix, remote, script,
                                   json.dumps(run), progress=lambda line: progress(f"{name}: {line}"))  # fmt: skip
        if not found:
            raise ImageError(f"pushed {name}, but the cache on the login node gave no record of it")
        self._resolving.pop(name, None)
        progress(f"{name} is on site '{self._ctx.name}' ({found[-1].size / 2**20:.0f} MiB): use --image {name}")
        return found[-1]

    push = _loop.blocking(apush)

    # -- forgetting -----------------------------------------------------------------------------------

    @_loop.on_loop
    async def aremove(self, image: str) -> list[CachedImage]:
        """Forget an image (by ref, pushed name or digest); its files go when no other ref uses them."""
        wanted = _pushed_ref(image) if is_pushed_name(image) else image
        self._resolving.pop(image, None)
        return await self._helper("remove", wanted)

    remove = _loop.blocking(aremove)

    @_loop.on_loop
    async def aprune(self, older_than_days: float = 0, max_bytes: int = 0) -> list[CachedImage]:
        """Delete the images unused for ``older_than_days`` days, then the least recently used ones until the
        cache holds at most ``max_bytes`` (0: no such limit). Returns what went."""
        if older_than_days < 0 or max_bytes < 0:
            raise ConfigError("prune takes a number of days and a size of at least 0")
        self._resolving.clear()
        return await self._helper("prune", str(older_than_days), str(int(max_bytes)))

    prune = _loop.blocking(aprune)


def _log_progress(line: str) -> None:
    """Progress where nobody asked for it: a first pull (minutes, perhaps) is said at WARNING, so a notebook
    or a Dask cluster starting shows why it waits; the pull's own lines are INFO."""
    (log.warning if _NOT_CACHED in line else log.info)(line)


def _image(record: dict) -> CachedImage:
    """A record the login node printed: data from the site, checked before a digest names anything or an
    ENTRYPOINT becomes a container's argv. A record from before offload kept ENTRYPOINT and CMD has neither."""
    source = "the site's image cache"
    run = _site_check(images_site.checked_run, {"entrypoint": record.get("entrypoint", []),
                                                "cmd": record.get("cmd", [])}, source)  # fmt: skip
    return CachedImage(record["ref"], checked_digest(record.get("digest"), source), record["path"],
                       int(record.get("size", 0)), float(record.get("pulled", 0)), float(record.get("used", 0)),
                       tuple(run["entrypoint"]), tuple(run["cmd"]))  # fmt: skip


def _done(image: CachedImage) -> asyncio.Future[CachedImage]:
    future: asyncio.Future[CachedImage] = asyncio.get_running_loop().create_future()
    future.set_result(image)
    return future


def _just_image(image: str):
    from offload.runtimes.base import ContainerContext

    return ContainerContext(image=image)


def _upload_progress(progress: Progress, name: str, size: int) -> Callable[[int, int], None]:
    shown = {"tenth": -1}

    def handler(done: int, total: int) -> None:
        tenth = 10 * done // total if total else 10
        if tenth != shown["tenth"]:
            shown["tenth"] = tenth
            progress(f"{name}: sent {done / 2**20:.0f} of {size / 2**20:.0f} MiB")

    return handler


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


Run = dict[str, list[str]]  # what an image runs when given no command: {"entrypoint": [...], "cmd": [...]}
_NO_RUN: Run = {"entrypoint": [], "cmd": []}


def _prepare(local: Path) -> tuple[str, Path, Run]:
    """What to upload: ``("sif", file)`` for a SIF, else ``("rootfs", tar.gz)`` of a root file system: made from a
    directory, taken as it is from a gzipped rootfs tarball, or flattened from a ``docker save`` / OCI archive;
    and what the image runs when given no command (an archive's ENTRYPOINT and CMD; none for the others, which
    carry no config). What is made is made the same way each time (sorted, no timestamps in the gzip header), so
    pushing the same image again is recognised and not sent twice."""
    local = local.expanduser()
    if not local.exists():
        raise ConfigError(f"{local}: no such file or directory here")
    if local.is_dir():
        return "rootfs", _tar_directory(local), _NO_RUN
    with local.open("rb") as f:
        head = f.read(128)
    if head.startswith(b"#!/usr/bin/env run-singularity") or b"SIF_MAGIC" in head:
        return "sif", local, _NO_RUN
    if not tarfile.is_tarfile(local):
        raise ConfigError(f"{local}: not a directory, a tarball, a 'docker save'/OCI archive or a .sif")
    with tarfile.open(local) as archive:
        names = {name.removeprefix("./") for name in archive.getnames()}
        if "manifest.json" in names or "oci-layout" in names:
            return "rootfs", *_flatten(archive, names, local.name)
    if head[:2] == b"\x1f\x8b":  # already a gzipped tarball of a root file system
        return "rootfs", local, _NO_RUN
    return "rootfs", _gzip(local), _NO_RUN


def _tar_directory(folder: Path) -> Path:
    def keep(member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if member.isdev():  # nobody unprivileged can make device files; runtimes bind the node's /dev
            return None
        member.uid = member.gid = 0
        member.uname = member.gname = ""
        return member

    fd, name = tempfile.mkstemp(prefix=_MADE, suffix=".tar.gz")
    with os.fdopen(fd, "wb") as out, gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder.resolve(), arcname=".", filter=keep)  # a symlink to a directory: the directory
    return Path(name)


def _gzip(local: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=_MADE, suffix=".tar.gz")
    with os.fdopen(fd, "wb") as out, local.open("rb") as src:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0) as gz:
            shutil.copyfileobj(src, gz, 1 << 20)
    return Path(name)


def _flatten(archive: tarfile.TarFile, names: set[str], label: str) -> tuple[Path, Run]:
    """The layers of a ``docker save`` (``manifest.json``) or OCI (``index.json``) archive applied in order, with
    their whiteouts, into one root file system, and the ENTRYPOINT and CMD of its config (a pod that gives no
    command runs them). An archive is data from anywhere: nothing in it is followed out of the scratch root (see
    :func:`_apply`), and its config must hold lists of strings."""

    def read(member: str) -> bytes:
        for candidate in (member, "./" + member):
            with contextlib.suppress(KeyError):
                extracted = archive.extractfile(candidate)
                if extracted is not None:
                    return extracted.read()
        raise ConfigError(f"{label}: the archive has no {member}")

    def blob(digest: str) -> str:
        return "blobs/" + checked_digest(digest, f"{label}'s index").replace(":", "/", 1)

    if "manifest.json" in names:
        manifest = json.loads(read("manifest.json"))[0]
        layers, config = manifest["Layers"], manifest.get("Config")
    else:
        found = json.loads(read("index.json"))
        while "manifests" in found:  # an index (of a multi-platform image, say): its first manifest
            found = json.loads(read(blob(found["manifests"][0]["digest"])))
        layers = [blob(layer["digest"]) for layer in found["layers"]]
        config = blob(found["config"]["digest"]) if found.get("config") else None
    run = _NO_RUN if config is None else _site_check(images_site.run_of, json.loads(read(config)), f"{label}'s config")
    root = Path(tempfile.mkdtemp(prefix="offload-rootfs-"))
    try:
        for layer in layers:
            with tarfile.open(fileobj=io.BytesIO(read(layer))) as tar:
                for member in tar:
                    _apply(tar, member, root, f"{label}, layer {layer}")
        return _tar_directory(root), run
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _apply(tar: tarfile.TarFile, member: tarfile.TarInfo, root: Path, where: str) -> None:
    """One member of a layer applied to the root file system at ``root``, the way a container engine applies it
    (a whiteout ``.wh.NAME`` deletes NAME, ``.wh..wh..opq`` empties its directory, anything else replaces what
    was at its path). Its directory is found component by component inside ``root`` (:func:`_in_root`) and what
    is replaced is deleted itself, never what it links to, and then made afresh: an earlier layer's symlink
    (``etc/link -> /home/me``) or hard link cannot carry a delete or a write to this machine's files. tarfile's
    own extraction is not used for that: it resolves names with this machine's view of the links."""
    parts = _member_parts(member.name, where)
    if not parts or member.isdev():  # the root itself; devices and FIFOs (runtimes bind the node's /dev)
        return
    *parent, leaf = parts
    if leaf.startswith(".wh."):
        folder = _in_root(root, parent, member.name, where, create=False)
        if leaf == ".wh..wh..opq":  # an opaque directory: what lower layers put there goes (hidden files too)
            for child in list(folder.iterdir()) if folder is not None else []:
                _remove(child)
            return
        if leaf[4:] in ("", ".", "..", ".wh."):
            raise ImageError(f"{where}: the whiteout {member.name!r} names no file: {_NOT_AN_IMAGE}")
        if folder is not None:
            _remove(folder / leaf[4:])
        return
    target = _in_root(root, parent, member.name, where, create=True) / leaf
    if member.isdir():
        if not stat.S_ISDIR(_lstat_mode(target)):
            _remove(target)
            target.mkdir()
        target.chmod(_mode(member, 0o700))
        return
    _remove(target)  # never written through: a symlink or a hard link here is replaced, not followed
    if member.issym():
        os.symlink(member.linkname, target)  # any target: it is only ever read inside the image (_in_root)
    elif member.islnk():
        *source_dir, source_leaf = _member_parts(member.linkname, where, member.name) or [""]
        folder = _in_root(root, source_dir, member.name, where, create=False)
        source = folder / source_leaf if folder is not None and source_leaf else root
        if source == root or not _lstat_mode(source) or stat.S_ISDIR(_lstat_mode(source)):
            raise ImageError(f"{where}: {member.name!r} is a hard link to {member.linkname!r}, which is no file "
                             f"of the image: {_NOT_AN_IMAGE}")  # fmt: skip
        os.link(source, target, follow_symlinks=False)
    elif member.isreg():
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out, tar.extractfile(member) or io.BytesIO() as data:
            shutil.copyfileobj(data, out, 1 << 20)
        target.chmod(_mode(member, 0o600))


_NOT_AN_IMAGE = (
    "it would reach outside the image, which 'docker save', podman and OCI tools never write. Nothing was "
    "sent; push an archive you made yourself (docker save IMAGE -o FILE), or the image's root directory"
)


def _member_parts(name: str, where: str, link_of: str = "") -> list[str]:
    """The components of a member's name (or of the target of the hard link ``link_of``) below the image's root;
    :class:`ImageError` for an absolute name or one with ``..``, which could only be meant to leave the image."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        what = f"the hard link {link_of!r} points to {name!r}, which" if link_of else f"the member {name!r}"
        raise ImageError(f"{where}: {what} is an absolute path or climbs with '..': {_NOT_AN_IMAGE}")
    return parts


def _in_root(root: Path, parts: list[str], name: str, where: str, *, create: bool) -> Path | None:
    """The real directory (no symlink on its path) that ``parts`` names in the image at ``root``, links read as
    the container will read them: an absolute target starts again at the image's root, and ``..`` stops there,
    so no path leaves ``root`` whatever links earlier layers made (``lib -> /usr/lib`` means the image's
    ``usr/lib``). A missing directory is made (``create``), or the answer is None. :class:`ImageError` naming
    the member for a path through a file, or through more links than Linux would follow."""
    todo = list(reversed(parts))
    real: list[str] = []
    hops = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if real:  # every component of real is a directory, not a link: its '..' is its parent
                real.pop()
            continue
        here = root.joinpath(*real, part)
        mode = _lstat_mode(here)
        if stat.S_ISLNK(mode):
            hops += 1
            if hops > _LINK_HOPS:
                raise ImageError(f"{where}: {name!r}: more than {_LINK_HOPS} symbolic links on its path (a loop of "
                                 "links in the image); fix the image's links and save it again")  # fmt: skip
            target = os.readlink(here)
            if target.startswith("/"):
                real = []
            todo.extend(reversed(target.split("/")))
            continue
        if not mode:
            if not create:
                return None
            here.mkdir()
        elif not stat.S_ISDIR(mode):
            raise ImageError(f"{where}: {name!r} is under {'/'.join([*real, part])!r}, which a lower layer made a "
                             "file, not a directory; this archive is damaged: save the image again")  # fmt: skip
        real.append(part)
    return root.joinpath(*real)


def _lstat_mode(path: Path) -> int:
    """The mode of what is at ``path`` itself (a link, not what it points to); 0 where nothing is."""
    try:
        return path.lstat().st_mode
    except FileNotFoundError:
        return 0


def _mode(member: tarfile.TarInfo, owner: int) -> int:
    """A member's permissions, as tar's ``tar`` filter keeps them: no setuid, setgid or sticky bit, no write for
    group and others; what the owner needs to build and delete the root file system added."""
    return (member.mode & 0o755) | owner


def _remove(path: Path) -> None:
    """Delete what is at ``path`` itself: a link, never what it points to; a directory with what is in it."""
    mode = _lstat_mode(path)
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)
    elif mode:
        path.unlink()
