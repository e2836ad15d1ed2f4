"""The image cache without a registry: what a push makes of each kind of local image, the cache's records on
a local 'login node' (this machine), and the exact shell lines each runtime is given. Pulls from a real
registry are tested on the test site (tests/integration/test_images.py)."""

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
import time

import pytest

import offload
from offload import ConfigError, ImageError
from offload.images import _prepare, is_pull, is_pushed_name
from offload.images_site import key_of, split_ref
from offload.plugins import plugins


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A site whose login node is this machine, with Charliecloud's cache layout (unpacked directories)."""
    config = tmp_path / "sites.toml"
    config.write_text(
        f'[sites.here]\ntransport = "local"\nscheduler = "local"\nruntime = "charliecloud"\n'
        f'workdir = "{tmp_path / "work"}"\n'
    )
    monkeypatch.setenv("OFFLOAD_CONFIG", str(config))
    site = offload.load_site("here")
    yield site
    site.close()


def rootfs(folder, marker="hello"):
    (folder / "etc").mkdir(parents=True)
    (folder / "etc" / "marker").write_text(marker)
    (folder / "bin").mkdir()
    (folder / "bin" / "tool").write_text("#!/bin/sh\necho tool\n")
    (folder / "bin" / "tool").chmod(0o755)
    return folder


def layer(files: dict[str, bytes | None]) -> bytes:
    """A layer tarball: None makes a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def oci_archive(path, layers):
    blobs = {}
    for data in layers:
        blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
    manifest = json.dumps({"layers": [{"digest": d} for d in blobs]}).encode()
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = json.dumps({"manifests": [{"digest": manifest_digest}]}).encode()
    with tarfile.open(path, "w") as tar:
        add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        add(tar, "index.json", index)
        add(tar, f"blobs/sha256/{manifest_digest[7:]}", manifest)
        for digest, data in blobs.items():
            add(tar, f"blobs/sha256/{digest[7:]}", data)
    return path


def members(upload):
    with tarfile.open(upload) as tar:
        return {m.name.removeprefix("./"): (tar.extractfile(m).read() if m.isfile() else None)
                for m in tar.getmembers()}  # fmt: skip


def test_which_images_the_cache_handles():
    assert is_pull("docker://ghcr.io/me/img:1")
    assert not is_pull("oras://ghcr.io/me/img:1") and not is_pull("/sw/img.sif")
    assert is_pushed_name("my-model.v2") and not is_pushed_name("/sw/img")
    # the names `docker tag` takes: parts joined by '/', an optional tag
    assert all(is_pushed_name(n) for n in ("me/train:1", "group/sub/name:tag", "a/b", "train:2026-01_rc.1"))
    for bad in ("docker://x", "a/../b", "a//b", "a/", "./a", "a:b:c", "a:", "-a", "a/.hidden", "x" * 256):
        assert not is_pushed_name(bad), bad
    assert split_ref("docker://python:3.11") == ("registry-1.docker.io", "library/python", "3.11")
    assert split_ref("docker://10.0.0.1:5000/offload/test:1") == ("10.0.0.1:5000", "offload/test", "1")
    assert split_ref("docker://ghcr.io/me/img") == ("ghcr.io", "me/img", "latest")
    assert split_ref("docker://ghcr.io/me/img@sha256:abc")[2] == "sha256:abc"
    assert key_of("docker://a/b:1") != key_of("docker://a/b_1") and "/" not in key_of("docker://a/b:1")


def test_a_directory_is_packed_the_same_way_twice_without_device_files(tmp_path):
    folder = rootfs(tmp_path / "root")
    kind, first = _prepare(folder)
    time.sleep(1.1)  # a timestamp in the gzip header would differ now
    _, second = _prepare(folder)
    assert kind == "rootfs"
    assert first.read_bytes() == second.read_bytes()
    assert members(first)["etc/marker"] == b"hello"
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert members(_prepare(link)[1])["etc/marker"] == b"hello"  # a symlink to a directory: the directory


def test_an_oci_archive_is_flattened_with_its_whiteouts(tmp_path):
    base = layer({"etc": None, "etc/marker": b"old", "etc/gone": b"x", "opt": None, "opt/a": b"a", "opt/b": b"b"})
    top = layer({"etc/marker": b"new", "etc/.wh.gone": b"", "opt/.wh..wh..opq": b"", "opt/c": b"c"})
    kind, upload = _prepare(oci_archive(tmp_path / "img.oci.tar", [base, top]))
    files = members(upload)
    assert kind == "rootfs"
    assert files["etc/marker"] == b"new"
    assert "etc/gone" not in files and "etc/.wh.gone" not in files
    assert "opt/a" not in files and "opt/b" not in files and files["opt/c"] == b"c"


def test_a_docker_save_archive_is_flattened(tmp_path):
    path = tmp_path / "saved.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "manifest.json", json.dumps([{"Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode())
        add(tar, "l1/layer.tar", layer({"etc": None, "etc/marker": b"one"}))
        add(tar, "l2/layer.tar", layer({"etc/marker": b"two"}))
    assert members(_prepare(path)[1])["etc/marker"] == b"two"


def test_tarballs_sif_files_and_what_is_neither(tmp_path):
    plain = tmp_path / "root.tar"
    with tarfile.open(plain, "w") as tar:
        add(tar, "./etc/marker", b"plain")
    kind, upload = _prepare(plain)
    assert kind == "rootfs" and upload != plain and upload.read_bytes()[:2] == b"\x1f\x8b"
    gz = tmp_path / "root.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    assert _prepare(gz) == ("rootfs", gz)  # sent as it is
    sif = tmp_path / "img.sif"
    sif.write_bytes(b"#!/usr/bin/env run-singularity\n" + b"\0" * 64)
    assert _prepare(sif) == ("sif", sif)
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    with pytest.raises(ConfigError, match="not a directory, a tarball"):
        _prepare(junk)
    with pytest.raises(ConfigError, match="no such file"):
        _prepare(tmp_path / "missing")


def test_push_list_resolve_remove_on_a_local_login_node(site, tmp_path):
    pushed = site.images.push(rootfs(tmp_path / "root"), "mine")
    assert pushed.name == "mine" and pushed.digest.startswith("sha256:")
    assert (tmp_path / "work" / "images" / pushed.digest.replace(":", "-") / "etc" / "marker").read_text() == "hello"
    for mount in range(10):  # what ch-run binds onto exists
        assert (tmp_path / "work/images" / pushed.digest.replace(":", "-") / f"mnt/{mount}").is_dir()
    assert site.images.resolve("mine") == pushed.path
    again = site.images.push(tmp_path / "root", "alias")  # the same content: not sent, not unpacked again
    assert again.path == pushed.path
    assert {i.name for i in site.images.list()} == {"mine", "alias"}
    assert not list((tmp_path / "work/images/uploads").iterdir())  # uploads go once converted
    site.images.remove("mine")
    assert (tmp_path / "work/images" / pushed.digest.replace(":", "-")).exists()  # 'alias' still uses it
    site.images.remove("alias")
    assert not (tmp_path / "work/images" / pushed.digest.replace(":", "-")).exists()
    with pytest.raises(ImageError, match="no image named 'mine'.*offload image push"):
        site.images.resolve("mine")
    with pytest.raises(ImageError, match="no cached image"):
        site.images.remove("mine")


def test_prune_removes_the_least_recently_used_first(site, tmp_path):
    old = site.images.push(rootfs(tmp_path / "a", "a"), "old")
    time.sleep(0.05)
    new = site.images.push(rootfs(tmp_path / "b", "b"), "new")
    assert [i.name for i in site.images.prune(max_bytes=new.size + 1)] == ["old"]
    assert [i.name for i in site.images.list()] == ["new"]
    assert not (tmp_path / "work/images" / old.digest.replace(":", "-")).exists()
    assert site.images.prune(older_than_days=1) == []
    with pytest.raises(ConfigError):
        site.images.prune(older_than_days=-1)


def test_a_failed_conversion_leaves_no_half_image(site, tmp_path, monkeypatch):
    broken = tmp_path / "broken.tar.gz"
    with tarfile.open(broken, "w:gz") as tar:  # a file, then a directory's member under the same name
        add(tar, "./etc", b"a file")
        add(tar, "./etc/marker", b"m")
    with pytest.raises(ImageError, match="conversion exited(.|\n)*Not a directory"):
        site.images.push(broken, "broken")
    leftovers = [p.name for p in (tmp_path / "work/images").iterdir() if p.name.startswith("sha256-")]
    assert leftovers == [] and site.images.list() == []


def test_bad_names_and_kinds_are_refused_before_anything_is_sent(site, tmp_path):
    with pytest.raises(ConfigError, match="image name .* as for `docker tag`"):
        site.images.push(tmp_path, "a/../b")
    sif = tmp_path / "img.sif"
    sif.write_bytes(b"#!/usr/bin/env run-singularity\n")
    with pytest.raises(ConfigError, match="charliecloud runs directories and SquashFS files, not a sif"):
        site.images.push(sif, "s")
    with pytest.raises(ConfigError, match="not a registry image"):
        site.images.pull("/sw/img")


def test_validation_treats_cached_images_as_the_path_they_will_be(site):
    site.validate(offload.JobSpec(["true"], image="docker://ghcr.io/me/img:1"))  # pulled on the login node
    site.validate(offload.JobSpec(["true"], image="mine"))
    node_pulls = site.config.with_overrides(pull="node")
    with pytest.raises(ConfigError, match='pull = "node"'):
        offload.Site(node_pulls).validate(offload.JobSpec(["true"], image="docker://ghcr.io/me/img:1"))


def run_script(script, env):
    return subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)


def test_each_runtime_builds_beside_the_entry_and_renames(tmp_path):
    for name, suffix in (("apptainer", ".sif"), ("charliecloud", ""), ("podman", ".oci.tar")):
        rt = plugins().runtime(name).factory(())
        assert rt.cache_suffix == suffix
        pull = rt.pull_script("docker://ghcr.io/me/img:1")
        assert '"$OFFLOAD_DEST.tmp"' in pull and pull.rstrip().endswith('mv "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST"')
    apptainer = plugins().runtime("apptainer").factory(())
    assert 'apptainer pull "$OFFLOAD_DEST.tmp" docker://ghcr.io/me/img:1' in apptainer.pull_script(
        "docker://ghcr.io/me/img:1"
    )
    assert apptainer.import_script("sif") == 'mv "$OFFLOAD_UPLOAD" "$OFFLOAD_DEST"'
    assert 'apptainer build "$OFFLOAD_DEST.tmp" "$OFFLOAD_DEST.rootfs"' in apptainer.import_script("rootfs")
    podman = plugins().runtime("podman").factory(())
    assert podman.cached_image("/c/sha256-x.oci.tar") == "oci-archive:/c/sha256-x.oci.tar"
    with pytest.raises(ConfigError):
        podman.import_script("sif")
    # a quoted ref: a hostile tag cannot run anything
    assert "'docker://x/y:1;touch /tmp/p'" in apptainer.pull_script("docker://x/y:1;touch /tmp/p")


def test_a_rootfs_unpacks_without_device_files(tmp_path):
    upload = tmp_path / "up.tar.gz"
    with tarfile.open(upload, "w:gz") as tar:
        add(tar, "./etc/marker", b"m")
        info = tarfile.TarInfo("./dev/null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    script = plugins().runtime("charliecloud").factory(()).import_script("rootfs")
    dest = tmp_path / "entry"
    done = run_script(script, {"PATH": "/usr/bin:/bin", "OFFLOAD_UPLOAD": str(upload), "OFFLOAD_DEST": str(dest)})
    assert done.returncode == 0, done.stderr
    assert (dest / "etc/marker").read_text() == "m" and not (dest / "dev/null").exists()
    assert (dest / "etc/hosts").exists() and (dest / "mnt/9").is_dir() and not (tmp_path / "entry.tmp").exists()


def test_a_pushed_image_may_be_named_as_docker_tag_names_go(site, tmp_path):
    """`me/train:1`, as users name images with `docker tag`; the cache keeps it apart from `me/train:2`."""
    one = site.images.push(rootfs(tmp_path / "one"), "me/train:1")
    two = site.images.push(rootfs(tmp_path / "two", marker="other"), "me/train:2")
    assert (one.name, two.name) == ("me/train:1", "me/train:2")
    assert site.images.resolve("me/train:1") == one.path
    assert "me/train:1" in [image.name for image in site.images.list()]
    site.validate(offload.JobSpec(["true"], image="me/train:2"))
