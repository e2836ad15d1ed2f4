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
import urllib.error

import pytest

import offload
from offload import ConfigError, ImageError, images_site
from offload.images import _image, _prepare, is_pull, is_pushed_name
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


def oci_archive(path, layers, config=None):
    blobs = {}
    for data in layers:
        blobs["sha256:" + hashlib.sha256(data).hexdigest()] = data
    found = {"layers": [{"digest": d} for d in blobs]}
    if config is not None:
        config_blob = json.dumps(config).encode()
        found["config"] = {"digest": "sha256:" + hashlib.sha256(config_blob).hexdigest()}
        blobs[found["config"]["digest"]] = config_blob
    manifest = json.dumps(found).encode()
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
    kind, first, run = _prepare(folder)
    time.sleep(1.1)  # a timestamp in the gzip header would differ now
    second = _prepare(folder)[1]
    assert kind == "rootfs" and run == {"entrypoint": [], "cmd": []}  # a directory carries no config
    assert first.read_bytes() == second.read_bytes()
    assert members(first)["etc/marker"] == b"hello"
    link = tmp_path / "link"
    link.symlink_to(folder)
    assert members(_prepare(link)[1])["etc/marker"] == b"hello"  # a symlink to a directory: the directory


def test_an_oci_archive_is_flattened_with_its_whiteouts(tmp_path):
    base = layer({"etc": None, "etc/marker": b"old", "etc/gone": b"x", "opt": None, "opt/a": b"a", "opt/b": b"b"})
    top = layer({"etc/marker": b"new", "etc/.wh.gone": b"", "opt/.wh..wh..opq": b"", "opt/c": b"c"})
    config = {"config": {"Entrypoint": ["/bin/tool"], "Cmd": None}}
    kind, upload, run = _prepare(oci_archive(tmp_path / "img.oci.tar", [base, top], config))
    files = members(upload)
    assert kind == "rootfs" and run == {"entrypoint": ["/bin/tool"], "cmd": []}
    assert files["etc/marker"] == b"new"
    assert "etc/gone" not in files and "etc/.wh.gone" not in files
    assert "opt/a" not in files and "opt/b" not in files and files["opt/c"] == b"c"


def docker_save(path, config):
    """A ``docker save`` archive of two layers and the image config ``config``."""
    with tarfile.open(path, "w") as tar:
        add(tar, "manifest.json", json.dumps([{"Config": "c0ffee.json", "Layers": ["l1/layer.tar", "l2/layer.tar"]}]
                                             ).encode())  # fmt: skip
        add(tar, "c0ffee.json", json.dumps(config).encode())
        add(tar, "l1/layer.tar", layer({"etc": None, "etc/marker": b"one", "bin": None}))
        add(tar, "l2/layer.tar", layer({"etc/marker": b"two", "bin/tool": b"#!/bin/sh\necho tool\n"}))
    return path


def test_a_docker_save_archive_is_flattened_with_its_entrypoint_and_cmd(tmp_path):
    config = {"architecture": "amd64", "config": {"Entrypoint": ["/bin/tool", "--serve"], "Cmd": ["--port", "80"]}}
    _, upload, run = _prepare(docker_save(tmp_path / "saved.tar", config))
    assert members(upload)["etc/marker"] == b"two"
    assert run == {"entrypoint": ["/bin/tool", "--serve"], "cmd": ["--port", "80"]}
    # what a container would run: nothing but lists of strings
    with pytest.raises(ImageError, match="saved.tar's config .* not lists of strings"):
        _prepare(docker_save(tmp_path / "saved.tar", {"config": {"Entrypoint": "/bin/tool --serve"}}))


def test_tarballs_sif_files_and_what_is_neither(tmp_path):
    plain = tmp_path / "root.tar"
    with tarfile.open(plain, "w") as tar:
        add(tar, "./etc/marker", b"plain")
    kind, upload, _ = _prepare(plain)
    assert kind == "rootfs" and upload != plain and upload.read_bytes()[:2] == b"\x1f\x8b"
    gz = tmp_path / "root.tar.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    none = {"entrypoint": [], "cmd": []}
    assert _prepare(gz) == ("rootfs", gz, none)  # sent as it is
    sif = tmp_path / "img.sif"
    sif.write_bytes(b"#!/usr/bin/env run-singularity\n" + b"\0" * 64)
    assert _prepare(sif) == ("sif", sif, none)
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


def test_a_pushed_archive_keeps_its_entrypoint_and_cmd_in_the_cache(site, tmp_path):
    config = {"config": {"Entrypoint": ["/bin/tool"], "Cmd": ["--once"]}}
    pushed = site.images.push(docker_save(tmp_path / "saved.tar", config), "tool")
    assert (pushed.entrypoint, pushed.cmd) == (("/bin/tool",), ("--once",))
    cached = site.images.cached("tool")  # the record of the image aresolve runs
    assert (cached.path, cached.entrypoint, cached.cmd) == (pushed.path, ("/bin/tool",), ("--once",))
    assert site.images.cached("/sw/img") is None  # a path on the site: its config is not offload's to know
    plain = site.images.push(rootfs(tmp_path / "root"), "plain")  # a directory carries no config
    assert (plain.entrypoint, plain.cmd) == ((), ())
    with pytest.raises(images_site.Failed, match="not lists of strings"):  # the login node checks what it is told
        images_site.import_upload(str(tmp_path / "work/images"), "local://x", pushed.digest, "", "", "true",
                                  '{"entrypoint": "/bin/tool", "cmd": []}')  # fmt: skip
    with pytest.raises(ImageError, match="not lists of strings"):  # and so does the client, of what it prints
        _image({"ref": "local://x", "digest": pushed.digest, "path": "/x", "entrypoint": [1], "cmd": []})


class Response(io.BytesIO):
    def __init__(self, body: bytes, headers: dict | None = None) -> None:
        super().__init__(body)
        self.headers = headers or {}


class Registry:
    """A registry's API as the login node reads it (``/v2/<path>/manifests/<ref>``, ``/v2/<path>/blobs/<digest>``,
    an anonymous bearer token), answering images_site's one network call, ``_get``."""

    CHALLENGE = 'Bearer realm="https://auth.example/token",service="reg",scope="repository:me/app:pull"'

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.asked: list[str] = []
        self.unreachable: tuple[str, ...] = ()  # parts of URLs that cannot be reached

    def put(self, what: str, document: dict | bytes) -> str:
        body = document if isinstance(document, bytes) else json.dumps(document).encode()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        self.files[what.replace("DIGEST", digest)] = body
        return digest

    def image(self, config: dict) -> str:
        """A multi-platform image ``me/app:1`` whose linux/amd64 manifest has ``config``: its index's digest."""
        config_digest = self.put("blobs/DIGEST", config)
        arm = self.put("manifests/DIGEST", {"config": {"digest": "sha256:" + "0" * 64}, "layers": []})
        amd = self.put("manifests/DIGEST", {"config": {"digest": config_digest}, "layers": [{"size": 7}]})
        index = {"manifests": [{"digest": arm, "platform": {"architecture": "arm64"}},
                               {"digest": amd, "platform": {"architecture": "amd64"}}]}  # fmt: skip
        self.put("manifests/1", index)
        return self.put("manifests/DIGEST", index)

    def __call__(self, url: str, headers: dict) -> Response:
        self.asked.append(url)
        if any(part in url for part in self.unreachable):
            raise urllib.error.URLError("no route to host")
        if url.startswith("https://auth.example/token?"):
            return Response(b'{"token": "t0"}')
        if headers.get("Authorization") != "Bearer t0":
            raise urllib.error.HTTPError(url, 401, "Unauthorized", {"WWW-Authenticate": self.CHALLENGE}, io.BytesIO())
        what = url.removeprefix("https://reg.example/v2/me/app/")
        if what not in self.files:
            body = b'{"errors": [{"code": "MANIFEST_UNKNOWN", "message": "not here"}]}'
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, io.BytesIO(body))
        return Response(self.files[what])


@pytest.fixture
def registry(monkeypatch):
    found = Registry()
    monkeypatch.setattr(images_site, "_get", found)
    return found


def ensure(cache, capsys, script='mkdir "$OFFLOAD_DEST"') -> dict:
    """``ensure`` of docker://reg.example/me/app:1 on this machine as a login node: the record it prints."""
    images_site.main(["ensure", str(cache), "docker://reg.example/me/app:1", "", script])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("offload-record ")]
    return json.loads(line.removeprefix("offload-record "))


def test_a_pull_records_the_entrypoint_and_cmd_of_its_platforms_config(tmp_path, registry, capsys):
    digest = registry.image({"architecture": "amd64", "config": {"Entrypoint": ["python3"], "Cmd": ["app.py"]}})
    record = ensure(tmp_path / "cache", capsys)
    assert record["digest"] == digest and (record["entrypoint"], record["cmd"]) == (["python3"], ["app.py"])
    assert (_image(record).entrypoint, _image(record).cmd) == (("python3",), ("app.py",))
    assert images_site.digest("docker://reg.example/me/app:1", with_size=True) == (digest, 7)  # the same manifest
    # an image whose config has neither: empty lists, which a pod without a command is told about
    registry.image({"config": {"Env": ["PATH=/bin"]}})
    other = ensure(tmp_path / "other", capsys)
    assert (other["entrypoint"], other["cmd"]) == ([], [])


def test_a_record_from_before_learns_its_entrypoint_and_cmd_once(tmp_path, registry, capsys):
    registry.image({"config": {"Entrypoint": ["/serve"], "Cmd": None}})
    cache = tmp_path / "cache"
    record = ensure(cache, capsys)
    path = cache / "refs" / f"{record['key']}.json"
    old = {k: v for k, v in record.items() if k not in ("key", "entrypoint", "cmd")}
    path.write_text(json.dumps(old))  # as an offload that kept no ENTRYPOINT wrote it
    registry.unreachable = ("/blobs/",)  # the registry answers for the tag, not for the config: it stays as it was
    assert "entrypoint" not in ensure(cache, capsys, script="exit 1")
    assert "entrypoint" not in json.loads(path.read_text())
    registry.unreachable = ()
    registry.asked.clear()
    learnt = ensure(cache, capsys, script="exit 1")  # the image is not pulled again: its record is written back
    assert (learnt["entrypoint"], learnt["cmd"]) == (["/serve"], [])
    assert json.loads(path.read_text())["entrypoint"] == ["/serve"]
    assert sum("/blobs/" in url for url in registry.asked) == 1
    registry.asked.clear()
    assert ensure(cache, capsys, script="exit 1")["entrypoint"] == ["/serve"]
    assert not any("/blobs/" in url for url in registry.asked)  # known now: not asked again


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"config": {"Entrypoint": "python3 app.py"}}, "not lists of strings"),
        ({"config": {"Cmd": ["app.py", 3]}}, "not lists of strings"),
        ({"config": ["python3"]}, "no image config"),
        (b"not json", "no JSON"),
    ],
)
def test_a_bad_config_is_refused_and_nothing_is_pulled(tmp_path, registry, capsys, config, words):
    registry.image({"config": {}})
    registry.files[next(k for k in registry.files if k.startswith("blobs/"))] = (
        config if isinstance(config, bytes) else json.dumps(config).encode()
    )  # served under the digest of another body: refused for that first
    with pytest.raises(images_site.Failed, match="sent a config of me/app that is not sha256:"):
        ensure(tmp_path / "cache", capsys)
    registry.image(config)  # now under its own digest: refused for what it says
    with pytest.raises(images_site.Failed, match=words):
        ensure(tmp_path / "cache", capsys)
    assert not list((tmp_path / "cache").glob("sha256-*")) and not list((tmp_path / "cache/refs").iterdir())


def test_the_registry_token_goes_to_the_registry_only(monkeypatch):
    """A blob is often served by a redirect to a CDN or a bucket's signed URL: the bearer token stays behind."""
    sent = []
    monkeypatch.setattr(images_site.urllib.request, "urlopen", lambda request, **_: sent.append(request))
    images_site._get("https://reg.example/v2/me/app/blobs/x", {"Accept": "*/*", "Authorization": "Bearer t0"})
    assert sent[0].unredirected_hdrs == {"Authorization": "Bearer t0"} and "Authorization" not in sent[0].headers
