"""The login node's side of offload's image cache. Standard library only: sent as a ``python3 -c`` program,
so each cache operation is one command over the site's connection.

    digest CACHE REF                       the registry's digest of REF now, and its download size
    ensure CACHE REF SUFFIX SCRIPT         REF (docker://...) in the cache: its registry digest now, pulled by
                                           SCRIPT unless that digest is there already; its record keeps the
                                           image's ENTRYPOINT and CMD (from its config blob)
    import CACHE REF DIGEST SUFFIX UPLOAD SCRIPT RUN   an uploaded image turned into a cache entry by SCRIPT; RUN is
                                           ``{"entrypoint": [...], "cmd": [...]}`` (JSON), kept in its record
    find CACHE REF                         the record of REF (marked used now)
    list CACHE                             every record
    remove CACHE WANTED                    forget a ref (its image goes when no other ref uses it)
    prune CACHE DAYS BYTES                 forget images unused for DAYS days, then the oldest beyond BYTES

Output is line by line: ``offload-record {json}`` for each record, ``offload-error message`` for a failure
(then exit 1); every other line is the pull's or the conversion's own progress.

A cache holds one image per digest (``sha256-<hex>`` plus the runtime's suffix: a directory, a ``.sif``) and one
small record per ref (``refs/<key>.json``); records are written whole and renamed, so a reader never sees half
of one. A pull or an import holds a lock per digest (``flock``) and looks again under it, so two clients (two
laptops, a triggerer and a hub) never pull the same image twice. A SCRIPT builds ``$OFFLOAD_DEST.tmp`` and
renames it to ``$OFFLOAD_DEST``: an entry is there whole or not at all.

What a registry says is not trusted: every digest is checked (:func:`check_digest`) where it comes in, before it
names a file, a lock or a command's argument, an image config must hash to its digest and hold lists of strings
(:func:`checked_run`) before it becomes a container's argv, and a record is acted on only when its path is an
entry of this cache (:func:`is_entry`). Every directory made here is 0700 (:func:`private_dir`): a pushed image
may be private.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json",
])  # fmt: skip
LOCK_WAIT = 3600  # seconds a client waits for another's pull of the same image
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
SUFFIX = re.compile(r"(\.[A-Za-z0-9_-]+)*")  # a runtime's cache suffix: "", ".sif", ".oci.tar"


class Failed(Exception):
    pass


def check_digest(value, source):
    """VALUE if it is a digest offload may name things after (``sha256:`` and 64 lowercase hex digits), else
    Failed naming SOURCE (who gave it). A digest comes from a registry's header, a manifest or an index, and
    becomes a cache entry's path, a lock's name and the argument of ``image rm``: a hostile one such as
    ``sha256:../../x`` would make those any path. So every digest goes through here where it comes in; the
    client checks what the login node says with this same function (:func:`offload.images.checked_digest`)."""
    if not isinstance(value, str) or DIGEST.fullmatch(value) is None:
        raise Failed(
            f"{source} gave {value!r} as a digest, which is not a sha256 digest ('sha256:' and 64 lowercase hex "
            "digits): refused, nothing was made or deleted after it. Check what that registry (or cache) serves"
        )
    return value


def entry_path(cache, digest_, suffix):
    """Where the cache keeps the image DIGEST_: ``<cache>/sha256-<hex><suffix>``, and nowhere else."""
    check_digest(digest_, "the image cache's caller")
    if SUFFIX.fullmatch(suffix) is None:
        raise Failed(f"the runtime's cache suffix {suffix!r} is not '.' and letters, digits, '_' or '-'")
    return os.path.join(cache, digest_.replace(":", "-") + suffix)


def is_entry(cache, rec):
    """Whether REC names an image of this cache: a sha256 digest, and the path :func:`entry_path` gives for it.
    A record written before digests were checked (or edited by hand) may name any path: such a record is never
    run, listed or followed, and forgetting it deletes no file but the record."""
    digest_, path = rec.get("digest"), rec.get("path")
    if not isinstance(digest_, str) or DIGEST.fullmatch(digest_) is None or not isinstance(path, str):
        return False
    name, prefix = os.path.basename(path), digest_.replace(":", "-")
    return (name.startswith(prefix) and SUFFIX.fullmatch(name[len(prefix):]) is not None
            and os.path.realpath(os.path.dirname(path)) == os.path.realpath(cache))  # fmt: skip


def private_dir(path):
    """Make PATH and each missing parent 0700, whatever the login session's umask (often 0022: readable by all).
    Neither ``os.makedirs(mode=...)`` (the last component only, on Python 3.7+) nor ``mkdir -p -m`` (the same) do
    that for parents, and the first use of a site makes the workdir itself. What was there already is left."""
    missing = []
    head = os.path.abspath(path)
    while not os.path.isdir(head) and os.path.dirname(head) != head:
        missing.append(head)
        head = os.path.dirname(head)
    for folder in reversed(missing):
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:  # another client's at the same time (made 0700 as well), or a file: said below
            if not os.path.isdir(folder):
                raise Failed(f"{folder} is a file: the image cache needs a directory there") from None
            continue
        os.chmod(folder, 0o700)  # a umask may take more than the group's and others' bits


def private_cache(cache):
    """The cache and its ``refs`` made private, the cache's own directory made 0700 even where an earlier offload
    left it readable by all (the workdir, perhaps the user's own choice of directory, is left as it is)."""
    private_dir(os.path.join(cache, "refs"))
    if os.stat(cache).st_mode & 0o077:
        os.chmod(cache, 0o700)


def split_ref(ref):
    """``docker://host/repo:tag`` -> ``(registry, repository, tag)``, with Docker Hub's rules for short names."""
    name = ref.split("://", 1)[-1]
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "registry-1.docker.io", name
        if "/" not in path:
            path = "library/" + path
    if "@" in path:
        path, tag = path.split("@", 1)
    elif ":" in path.rsplit("/", 1)[-1]:
        path, tag = path.rsplit(":", 1)
    else:
        tag = "latest"
    return registry, path, tag


def _get(url, headers):
    request = urllib.request.Request(url)
    for name, value in headers.items():  # a bearer token stays with the registry: a blob's redirect (to a CDN,
        # a bucket's signed URL) gets none, which such a URL would refuse or an untrusted host would receive
        (request.add_unredirected_header if name == "Authorization" else request.add_header)(name, value)
    return urllib.request.urlopen(request, timeout=60, context=ssl.create_default_context())


def _token(challenge):
    """An anonymous token for a registry that asks for one (Docker Hub, ghcr.io): ``Bearer realm=...``."""
    fields = {}
    for part in challenge.split(" ", 1)[1].split(","):
        key, _, value = part.partition("=")
        fields[key.strip()] = value.strip().strip('"')
    query = urllib.parse.urlencode({k: v for k, v in fields.items() if k in ("service", "scope")})
    with _get(fields["realm"] + "?" + query, {}) as response:
        body = json.loads(response.read().decode())
    return body.get("token") or body.get("access_token")


def _registry_get(registry, path, what, headers):
    """(``Docker-Content-Digest`` or None, body) of ``GET /v2/PATH/WHAT`` (``manifests/REF``, ``blobs/DIGEST``),
    with an anonymous bearer token when the registry asks for one (kept in HEADERS for the next call); Failed
    with the registry's own words."""
    url = f"https://{registry}/v2/{path}/{what}"
    for _ in range(2):
        try:
            with _get(url, headers) as response:
                return response.headers.get("Docker-Content-Digest"), response.read()
        except urllib.error.HTTPError as exc:
            challenge = exc.headers.get("WWW-Authenticate", "")
            if exc.code == 401 and challenge.lower().startswith("bearer") and "Authorization" not in headers:
                headers["Authorization"] = "Bearer " + _token(challenge)
                continue
            detail = exc.read().decode("utf-8", "replace").strip()
            with contextlib.suppress(ValueError, AttributeError):
                errors = json.loads(detail).get("errors") or []
                detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or detail
            raise Failed(f"the registry {registry} says {exc.code} for {path} ({what}): {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Failed(f"cannot reach the registry {registry} from the login node: {reason}") from None
    raise Failed(f"the registry {registry} refused an anonymous token for {path}")


def _manifest(registry, path, reference, headers):
    """(digest, body) of a manifest; Failed with the registry's own words."""
    found, body = _registry_get(registry, path, f"manifests/{reference}", headers)
    found = found or "sha256:" + hashlib.sha256(body).hexdigest()
    return check_digest(found, f"the registry {registry} (for {path}:{reference})"), body


def _platform_manifest(registry, path, body, headers):
    """The manifest in BODY, or for a multi-platform index the one of this machine's platform (linux/amd64):
    the one whose layers a pull takes and whose config it runs."""
    manifest = json.loads(body.decode())
    if "manifests" in manifest:
        chosen = [m for m in manifest["manifests"] if m.get("platform", {}).get("architecture") in ("amd64", None)]
        wanted = check_digest((chosen or manifest["manifests"])[0].get("digest"), f"the index of {registry}/{path}")
        _, body = _manifest(registry, path, wanted, headers)
        manifest = json.loads(body.decode())
    return manifest


def digest(ref, with_size=False):
    """The registry's digest of REF now (tags move), and with ``with_size`` the compressed size of its layers
    (of the linux/amd64 image of a multi-platform one); Failed with the registry's own words."""
    registry, path, tag = split_ref(ref)
    headers = {"Accept": ACCEPT}
    if ":" in tag:  # a digest (a tag has no ':'): a path and a URL are made of it
        check_digest(tag, f"the image reference {ref!r}")
        if not with_size:
            return tag, 0
    found, body = _manifest(registry, path, tag, headers)
    if not with_size:
        return found, 0
    manifest = _platform_manifest(registry, path, body, headers)
    return found, sum(layer.get("size", 0) for layer in manifest.get("layers", []))


def checked_run(run, source):
    """RUN if it is ``{"entrypoint": [...], "cmd": [...]}`` of strings, else Failed naming SOURCE. What an image
    runs when given no command becomes a container's argv: it comes from a registry, an archive or a record, and
    nothing but lists of strings may go there."""
    if (not isinstance(run, dict) or sorted(run) != ["cmd", "entrypoint"]
            or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in run.values())):  # fmt: skip
        raise Failed(
            f"{source} gave {str(run)[:200]!r} as an image's ENTRYPOINT and CMD, which are not lists of strings: "
            "refused. Check what that registry (or archive) serves"
        )
    return {"entrypoint": list(run["entrypoint"]), "cmd": list(run["cmd"])}


def run_of(config, source):
    """``{"entrypoint": [...], "cmd": [...]}`` of an image config (OCI's and Docker's: its ``config`` object's
    ``Entrypoint`` and ``Cmd``, empty where it has none): what Kubernetes runs when a container gives no
    command. Failed naming SOURCE for anything else."""
    settings = config.get("config") if isinstance(config, dict) else "no JSON object"
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise Failed(f"{source} is no image config (its 'config' is {str(settings)[:100]!r}): refused")
    return checked_run({"entrypoint": settings.get("Entrypoint") or [], "cmd": settings.get("Cmd") or []}, source)


def image_run(ref, digest_):
    """What the image REF (the manifest DIGEST_, the one being pulled) runs when given no command, from its
    config blob: the blob's digest is checked before it names a URL, and its body must hash to it, so what a
    container runs is what that manifest says."""
    registry, path, _ = split_ref(ref)
    headers = {"Accept": ACCEPT}
    _, body = _manifest(registry, path, check_digest(digest_, "the image cache's caller"), headers)
    manifest = _platform_manifest(registry, path, body, headers)
    source = f"the manifest of {registry}/{path}"
    config = check_digest((manifest.get("config") or {}).get("digest"), source)
    _, blob = _registry_get(registry, path, f"blobs/{config}", headers)
    if "sha256:" + hashlib.sha256(blob).hexdigest() != config:
        raise Failed(f"the registry {registry} sent a config of {path} that is not {config}: refused")
    try:
        found = json.loads(blob.decode())
    except ValueError:
        raise Failed(f"the config {config} of {registry}/{path} is no JSON: refused") from None
    return run_of(found, f"the config {config} of {registry}/{path}")


def key_of(ref):
    """A file name for a ref: readable, and unique (a hash of the whole ref)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in ref.split("://", 1)[-1])[:80]
    return safe + "-" + hashlib.sha256(ref.encode()).hexdigest()[:10]


def records(cache, every=False):
    """The cache's records; only those naming an entry of this cache (:func:`is_entry`) unless ``every``."""
    folder = os.path.join(cache, "refs")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    found = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(found, dict) and isinstance(found.get("ref"), str) and (every or is_entry(cache, found)):
                found["key"] = name[:-5]
                yield found


def find(cache, ref):
    for rec in records(cache):
        if rec["ref"] == ref:
            return rec
    return None


def size_of(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def write_record(cache, rec):
    folder = os.path.join(cache, "refs")
    private_dir(folder)
    key = key_of(rec["ref"])
    tmp = os.path.join(folder, f".{key}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump({k: v for k, v in rec.items() if k != "key"}, f)
    os.replace(tmp, os.path.join(folder, key + ".json"))
    rec["key"] = key
    return rec


def emit(rec):
    print("offload-record " + json.dumps(rec), flush=True)


def used(cache, rec):
    rec["used"] = time.time()
    emit(write_record(cache, rec))


@contextlib.contextmanager
def locked(cache, name):
    with open(os.path.join(cache, ".lock-" + name), "w") as lock:
        deadline = time.time() + LOCK_WAIT
        told = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if not told:
                    print("waiting for another pull of this image to finish", flush=True)
                    told = True
                if time.time() > deadline:
                    raise Failed(f"another pull of this image has held its lock for {LOCK_WAIT} s") from None
                time.sleep(1)
        yield


def build(cache, ref, digest_, dest, script, extra_env, run):
    """Run SCRIPT to make ``dest`` unless it is there; record REF as the image at ``dest``, with RUN (what it
    runs when given no command: :func:`checked_run`; a callable is asked for it under the lock, only when no
    record of REF at ``dest`` knows it already: two clients pulling one image read its config once)."""
    name = os.path.basename(dest)
    with locked(cache, name):
        old = find(cache, ref) or {}
        if callable(run):
            known = old.get("path") == dest and os.path.exists(dest) and "entrypoint" in old
            run = {"entrypoint": old["entrypoint"], "cmd": old.get("cmd", [])} if known else run()
        if not os.path.exists(dest):
            print("offload-building", flush=True)
            env = dict(os.environ, OFFLOAD_DEST=dest, **extra_env)
            code = subprocess.call(["sh", "-c", script], env=env, stderr=subprocess.STDOUT)
            if code != 0 or not os.path.exists(dest):
                shutil.rmtree(dest + ".tmp", ignore_errors=True)
                with contextlib.suppress(OSError):
                    os.remove(dest + ".tmp")
                raise Failed(f"the runtime's conversion exited with status {code}")
        now = time.time()
        rec = {"ref": ref, "digest": digest_, "path": dest, "size": size_of(dest), "pulled": now, "used": now, **run}
        if old.get("path") == dest:
            rec["pulled"] = old.get("pulled", now)
        emit(write_record(cache, rec))


def ensure(cache, ref, suffix, script):
    """REF in the cache at the registry's digest now, and its record. A record written before offload kept the
    image's ENTRYPOINT and CMD learns them here, once (its config is asked for, then written back); where the
    registry does not answer, the record stays as it was and the image runs all the same."""
    known = find(cache, ref)
    try:
        digest_, _ = digest(ref)
    except Failed as exc:
        if known is None or not os.path.exists(known["path"]):
            raise
        print("{}; running the cached {}".format(exc, known["digest"][:19]), flush=True)
        return used(cache, known)
    fresh = known is not None and known["digest"] == digest_ and os.path.exists(known["path"])
    if fresh and "entrypoint" in known:
        return used(cache, known)
    if fresh:
        try:
            known.update(image_run(ref, digest_))
        except Failed as exc:
            print(f"{exc}; the image's ENTRYPOINT and CMD stay unknown for now", flush=True)
        return used(cache, known)
    build(cache, ref, digest_, entry_path(cache, digest_, suffix), script, {}, lambda: image_run(ref, digest_))


def import_upload(cache, ref, digest_, suffix, upload, script, run):
    """The upload turned into the image REF by SCRIPT; RUN (JSON) is what it runs when given no command, which
    the client read from a ``docker save`` or OCI archive (empty lists for a directory or a plain tarball)."""
    check_digest(digest_, "the client")
    try:
        run = checked_run(json.loads(run), "the client")
    except ValueError:
        raise Failed(f"the client gave {run[:200]!r} as an image's ENTRYPOINT and CMD, which is no JSON") from None
    uploads = os.path.join(os.path.abspath(cache), "uploads")
    if upload and (os.path.dirname(os.path.abspath(upload)) != uploads
                   or not os.path.basename(upload).startswith(digest_[7:] + ".")):  # fmt: skip
        raise Failed(f"the upload {upload!r} is not this image's file in {uploads}: nothing imported or deleted")
    try:
        build(cache, ref, digest_, entry_path(cache, digest_, suffix), script, {"OFFLOAD_UPLOAD": upload}, run)
    finally:
        with contextlib.suppress(OSError):
            os.remove(upload)


def remove(cache, wanted):
    """Forget the records WANTED names; delete an image's files when no record uses them any more, and only
    where :func:`is_entry` says they are this cache's (a stray record goes alone)."""
    all_records = list(records(cache, every=True))
    gone = [r for r in all_records if wanted in (r["key"], r["ref"], r.get("digest"), r["ref"].split("://")[-1])]
    if not gone:
        raise Failed(f"no cached image {wanted!r}: 'offload image ls' lists them")
    for rec in gone:
        os.remove(os.path.join(cache, "refs", rec["key"] + ".json"))
    still = {r["path"] for r in records(cache)}
    for rec in gone:
        path = rec.get("path")
        if not is_entry(cache, rec):
            print(f"forgot a record naming {path!r}, which is no entry of this cache: left that path alone")
            continue
        if path not in still and os.path.lexists(path):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        emit(rec)


def prune(cache, days, limit):
    for stray in records(cache, every=True):  # records naming no entry of this cache hold nothing: they go
        if not is_entry(cache, stray):
            remove(cache, stray["key"])
    by_path = {}
    for rec in records(cache):
        by_path.setdefault(rec["path"], []).append(rec)
    images = sorted(by_path.values(), key=lambda rs: max(r.get("used", 0) for r in rs))
    now, total = time.time(), sum(rs[0].get("size", 0) for rs in images)
    for rs in images:
        last = max(r.get("used", 0) for r in rs)
        if (days > 0 and now - last > days * 86400) or (limit > 0 and total > limit):
            for rec in rs:
                remove(cache, rec["key"])
            total -= rs[0].get("size", 0)


def main(argv):
    mode, cache = argv[0], argv[1]
    private_cache(cache)
    if mode == "digest":
        found, size = digest(argv[2], with_size=True)
        print(f"offload-digest {found} {size}")
    elif mode == "ensure":
        ensure(cache, argv[2], argv[3], argv[4])
    elif mode == "import":
        import_upload(cache, argv[2], argv[3], argv[4], argv[5], argv[6], argv[7])
    elif mode == "find":
        rec = find(cache, argv[2])
        if rec is None:
            raise Failed("missing")
        used(cache, rec)
    elif mode == "list":
        for rec in records(cache):
            emit(rec)
    elif mode == "remove":
        remove(cache, argv[2])
    elif mode == "prune":
        prune(cache, float(argv[2]), int(argv[3]))
    else:
        raise Failed(f"unknown mode {mode!r}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Failed as exc:
        print("offload-error " + str(exc), flush=True)
        sys.exit(1)
