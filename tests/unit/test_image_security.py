"""What a hostile image archive, a hostile registry or another user of the login node must not be able to do
with offload's image cache: flattening an archive here touches nothing outside its scratch root file system, a
digest from a registry never becomes a path until it is checked, and the cache on the site is private."""

import hashlib
import io
import json
import os
import stat
import tarfile
import tempfile

import pytest

import offload
from offload import ImageError, images, images_site
from offload.images import _prepare
from offload.images_site import Failed

GOOD = "sha256:" + "ab" * 32


# -- crafted archives ---------------------------------------------------------------------------------------


def entry(name, data=b"", *, kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data if kind == tarfile.REGTYPE else None


def directory(name):
    return entry(name, kind=tarfile.DIRTYPE, mode=0o755)


def symlink(name, target):
    return entry(name, kind=tarfile.SYMTYPE, link=target, mode=0o777)


def hardlink(name, target):
    return entry(name, kind=tarfile.LNKTYPE, link=target)


def layer_tar(*entries) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return out.getvalue()


def docker_save(path, *layers):
    """An archive laid out the way ``docker save`` (before Docker 25) writes one: the legacy "Combined Image JSON +
    Filesystem Changeset Format" of moby's image/spec/v1.1.md, as written by moby's image/tarexport/save.go. One
    directory per layer named by its id, holding ``VERSION``, ``json`` and ``layer.tar``; the image's config as
    ``<hex>.json``; ``repositories``; and ``manifest.json``, a list with one object per image whose ``Layers``
    name the layer tarballs base first."""
    ids = [hashlib.sha256(data).hexdigest() for data in layers]
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                         "diff_ids": [f"sha256:{i}" for i in ids]}}).encode()  # fmt: skip
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["crafted:latest"], "Layers": [f"{i}/layer.tar" for i in ids]}]
    with tarfile.open(path, "w") as tar:
        files = [directory(layer_id) for layer_id in ids]
        for parent, layer_id, data in zip([None, *ids[:-1]], ids, layers, strict=True):
            files += [entry(f"{layer_id}/VERSION", b"1.0"), entry(f"{layer_id}/layer.tar", data),
                      entry(f"{layer_id}/json", json.dumps({"id": layer_id, "parent": parent}).encode())]  # fmt: skip
        files += [entry(config_name, config), entry("manifest.json", json.dumps(manifest).encode()),
                  entry("repositories", json.dumps({"crafted": {"latest": ids[-1]}}).encode())]  # fmt: skip
        for info, data in files:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


def flattened(upload):
    with tarfile.open(upload) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


@pytest.fixture
def victim(tmp_path, monkeypatch):
    """Files of the user's, outside the scratch root file system (which is made under ``tmp_path/tmp``, so a
    relative link can be aimed at them), that flattening must leave exactly as they are."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    home = tmp_path / "victim"
    (home / "sub").mkdir(parents=True)
    (home / "important").write_text("keep me")
    (home / ".hidden").write_text("keep me too")
    (home / "sub" / "file").write_text("and me")
    return home


def untouched(home):
    assert (home / "important").read_text() == "keep me"
    assert (home / ".hidden").read_text() == "keep me too"
    assert (home / "sub" / "file").read_text() == "and me"
    assert sorted(p.name for p in home.iterdir()) == [".hidden", "important", "sub"]


# From the scratch root tmp_path/tmp/offload-rootfs-XXX, "etc/link" -> "../../../victim" is tmp_path/victim.
LINKS = {"absolute": lambda home: str(home), "relative": lambda home: "../../../victim"}


@pytest.mark.parametrize("how", sorted(LINKS))
@pytest.mark.parametrize(
    "second",
    [
        [entry("etc/link/.wh.important")],
        [entry("etc/link/.wh..wh..opq")],
        [entry("etc/link/.wh.sub")],
        [entry("etc/link/important", b"overwritten")],
        [directory("etc/link/sub"), entry("etc/link/sub/file", b"overwritten")],
        [symlink("etc/link/important", "/dev/null")],
    ],
    ids=["whiteout", "opaque", "whiteout-dir", "file", "dir-file", "symlink"],
)
def test_a_later_layer_never_reaches_through_a_symlink_out_of_the_rootfs(tmp_path, victim, how, second):
    saved = docker_save(tmp_path / "crafted.tar", layer_tar(directory("etc"), symlink("etc/link", LINKS[how](victim))),
                        layer_tar(*second))  # fmt: skip
    upload = _prepare(saved)[1]
    untouched(victim)
    files = flattened(upload)
    assert files["etc/link"].issym()  # the link itself is part of the image, as it was made


def test_a_link_is_read_from_the_images_root_as_the_container_would(tmp_path, victim):
    """An absolute link means the image's own directory (``lib -> /usr/lib`` in a merged-/usr image), and a
    relative one that climbs above the root stops there, as in the container: what a later layer puts under such
    a link lands inside the image."""
    saved = docker_save(tmp_path / "crafted.tar",
                        layer_tar(directory("usr"), directory("usr/lib"), symlink("lib", "/usr/lib"),
                                  directory("etc"), symlink("etc/up", "../../../victim")),
                        layer_tar(entry("lib/libx.so", b"x"), entry("etc/up/important", b"inside")))  # fmt: skip
    files = flattened(_prepare(saved)[1])
    untouched(victim)
    assert "usr/lib/libx.so" in files and files["lib"].issym()
    assert "victim/important" in files


def test_a_file_over_a_symlink_replaces_the_link_and_never_writes_through_it(tmp_path, victim):
    saved = docker_save(tmp_path / "crafted.tar",
                        layer_tar(directory("etc"), symlink("etc/passwd", str(victim / "important"))),
                        layer_tar(entry("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")))  # fmt: skip
    with tarfile.open(_prepare(saved)[1]) as tar:
        assert tar.extractfile("./etc/passwd").read().startswith(b"root:")
    untouched(victim)


@pytest.mark.parametrize(
    ("member", "error"),
    [
        (entry("/etc/evil", b"x"), "/etc/evil"),
        (entry("../evil", b"x"), "../evil"),
        (entry("etc/../../evil", b"x"), "etc/../../evil"),
        (hardlink("etc/shadow", "/etc/shadow"), "etc/shadow"),
        (hardlink("etc/h", "../victim/important"), "etc/h"),
        (hardlink("etc/h", "etc/link/important"), "etc/h"),  # through a symlink: not a file of the image
    ],
    ids=["absolute", "dotdot", "inner-dotdot", "hardlink-absolute", "hardlink-dotdot", "hardlink-via-symlink"],
)
def test_members_that_would_escape_are_refused_by_name(tmp_path, victim, member, error):
    saved = docker_save(tmp_path / "crafted.tar", layer_tar(directory("etc"), symlink("etc/link", str(victim))),
                        layer_tar(member, entry("etc/h", b"overwritten")))  # fmt: skip
    with pytest.raises(ImageError, match=f"crafted.tar.*{error}"):
        _prepare(saved)
    untouched(victim)
    assert not list((tmp_path / "tmp").iterdir())  # the scratch root is gone too


def test_a_hardlink_inside_the_image_is_kept_and_a_later_file_does_not_write_through_it(tmp_path, victim):
    saved = docker_save(tmp_path / "crafted.tar", layer_tar(directory("bin"), entry("bin/a", b"same", mode=0o755),
                                                            hardlink("bin/b", "bin/a")),
                        layer_tar(entry("bin/b", b"changed")))  # fmt: skip
    with tarfile.open(_prepare(saved)[1]) as tar:
        assert tar.extractfile("./bin/a").read() == b"same" and tar.extractfile("./bin/b").read() == b"changed"


def test_flattening_keeps_modes_and_an_opaque_directory_loses_hidden_files_too(tmp_path, victim):
    saved = docker_save(tmp_path / "saved.tar",
                        layer_tar(directory("bin"), entry("bin/tool", b"#!/bin/sh\n", mode=0o4755),
                                  directory("opt"), entry("opt/.dot", b"old"), entry("opt/a", b"old")),
                        layer_tar(entry("opt/.wh..wh..opq"), entry("opt/b", b"new")))  # fmt: skip
    files = flattened(_prepare(saved)[1])
    assert stat.S_IMODE(files["bin/tool"].mode) == 0o755  # executable still; no setuid from an archive
    assert "opt/.dot" not in files and "opt/a" not in files and "opt/b" in files


# -- digests from a registry ------------------------------------------------------------------------------------


NOT_DIGESTS = ["sha256:../../../home/me", "sha256:" + "AB" * 32, "sha256:" + "ab" * 32 + "\n", "sha512:" + "ab" * 64,
               "sha256:" + "ab" * 31, "", None, "sha256:" + "ab" * 32 + "/x"]  # fmt: skip


@pytest.mark.parametrize("bad", NOT_DIGESTS)
def test_a_digest_is_sha256_and_64_hex_digits_or_refused(bad):
    assert images_site.check_digest(GOOD, "test") == GOOD
    with pytest.raises(Failed, match="the registry gave .* not a sha256 digest"):
        images_site.check_digest(bad, "the registry")
    with pytest.raises(ImageError, match="the login node gave .* not a sha256 digest"):
        images.checked_digest(bad, "the login node")


class Response:
    def __init__(self, body, headers):
        self.body, self.headers = body, headers

    def read(self):
        return self.body

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def hostile_registry(monkeypatch, header, body=b"{}"):
    monkeypatch.setattr(images_site, "_get", lambda url, headers: Response(body, {"Docker-Content-Digest": header}))


def test_a_hostile_registry_digest_never_becomes_a_path_on_the_site(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    cache = tmp_path / "work" / "images"
    hostile_registry(monkeypatch, "sha256:../../victim")
    with pytest.raises(Failed, match="registry.example.*sha256:../../victim.*not a sha256 digest"):
        images_site.main(["ensure", str(cache), "docker://registry.example/me/img:1", "", "touch $OFFLOAD_DEST"])
    with pytest.raises(Failed, match="not a sha256 digest"):
        images_site.digest("docker://registry.example/me/img:1", with_size=True)
    index = json.dumps({"manifests": [{"digest": "sha256:../../x", "platform": {"architecture": "amd64"}}]})
    hostile_registry(monkeypatch, GOOD, index.encode())
    with pytest.raises(Failed, match="sha256:../../x"):
        images_site.digest("docker://registry.example/me/img:1", with_size=True)
    with pytest.raises(Failed, match="not a sha256 digest"):  # a digest in the ref itself
        images_site.digest("docker://registry.example/me/img@sha256:../../victim")
    assert victim.is_dir() and sorted(p.name for p in cache.iterdir()) == ["refs"]


def test_remove_and_prune_never_delete_what_a_record_names_outside_the_cache(tmp_path):
    """A record made before digests were checked (or edited by hand) may name any path: forgetting it removes the
    record, never that path."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important").write_text("keep me")
    cache = tmp_path / "work" / "images"
    images_site.main(["list", str(cache)])
    for ref, digest in (("docker://a/b:1", "sha256:../../victim"), ("docker://a/c:1", GOOD)):
        images_site.write_record(str(cache), {"ref": ref, "digest": digest, "path": str(victim), "size": 10,
                                              "pulled": 0, "used": 0})  # fmt: skip
    images_site.main(["remove", str(cache), "docker://a/b:1"])  # the record goes, not the victim
    assert (victim / "important").read_text() == "keep me"
    images_site.main(["prune", str(cache), "0", "1"])  # a valid digest, but a path outside the cache
    assert (victim / "important").read_text() == "keep me"
    assert list(images_site.records(str(cache), every=True)) == []  # stray records go with prune


def test_the_client_checks_what_the_login_node_says_is_a_digest(tmp_path, monkeypatch):
    config = tmp_path / "sites.toml"
    config.write_text(f'[sites.here]\ntransport = "local"\nscheduler = "local"\nruntime = "charliecloud"\n'
                      f'workdir = "{tmp_path / "work"}"\n')  # fmt: skip
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    site = offload.load_site("here")
    try:

        async def says(*args, **kwargs):
            return ["offload-digest sha256:../../x 12"]

        monkeypatch.setattr(site.images, "_run_helper", says)
        with pytest.raises(ImageError, match="not a sha256 digest"):
            offload._loop.run(site.images.aremote_digest("docker://a/b:1"))
        with pytest.raises(ImageError, match="not a sha256 digest"):
            images._image({"ref": "docker://a/b:1", "digest": "sha256:../../x", "path": "/x"})
    finally:
        site.close()


# -- a private cache ---------------------------------------------------------------------------------------------


@pytest.fixture
def open_umask():
    """The umask of a typical login session (0022): what is not made private explicitly is readable by all."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_the_site_helper_makes_every_directory_of_the_cache_private(tmp_path, open_umask):
    cache = tmp_path / "deep" / "work" / "images"
    images_site.main(["list", str(cache)])
    for made in (tmp_path / "deep", tmp_path / "deep" / "work", cache, cache / "refs"):
        assert mode(made) == 0o700, made
    older = tmp_path / "older" / "images"  # a cache made by an earlier version, readable by all
    older.mkdir(parents=True, mode=0o755)
    images_site.main(["list", str(older)])
    assert mode(older) == 0o700


def test_a_push_leaves_the_workdir_the_cache_and_its_uploads_private(tmp_path, monkeypatch, open_umask):
    config = tmp_path / "sites.toml"
    config.write_text(f'[sites.here]\ntransport = "local"\nscheduler = "local"\nruntime = "charliecloud"\n'
                      f'workdir = "{tmp_path / "work"}"\n')  # fmt: skip
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    site = offload.load_site("here")
    commands = []
    run = site.transport.run

    async def recording(argv, **kwargs):
        commands.append(list(argv))
        return await run(argv, **kwargs)

    monkeypatch.setattr(site.transport, "run", recording)
    root = tmp_path / "root" / "etc"
    root.mkdir(parents=True)
    (root / "marker").write_text("hi")
    try:
        site.images.push(tmp_path / "root", "mine")
    finally:
        site.close()
    images = tmp_path / "work" / "images"
    for made in (tmp_path / "work", images, images / "refs", images / "uploads"):
        assert mode(made) == 0o700, made
    mkdirs = [argv for argv in commands if argv[0] == "mkdir" or (argv[:2] == ["sh", "-c"] and "mkdir" in argv[2])]
    assert mkdirs and all(argv[2].startswith("umask 077 && mkdir -p") for argv in mkdirs), mkdirs
