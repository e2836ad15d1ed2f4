"""The login node's side of offload's image cache. Standard library only: sent as a ``python3 -c`` program,
so each cache operation is one command over the site's connection.

    digest CACHE REF                       the registry's digest of REF now, and its download size
    ensure CACHE REF SUFFIX SCRIPT         REF (docker://...) in the cache: its registry digest now, pulled by
                                           SCRIPT unless that digest is there already
    import CACHE REF DIGEST SUFFIX UPLOAD SCRIPT   an uploaded image turned into a cache entry by SCRIPT
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
"""

import contextlib
import fcntl
import hashlib
import json
import os
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


class Failed(Exception):
    pass


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
    request = urllib.request.Request(url, headers=headers)
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


def _manifest(registry, path, reference, headers):
    """(digest, body) of a manifest; Failed with the registry's own words."""
    url = f"https://{registry}/v2/{path}/manifests/{reference}"
    for _ in range(2):
        try:
            with _get(url, headers) as response:
                body = response.read()
                return response.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(
                    body
                ).hexdigest(), body
        except urllib.error.HTTPError as exc:
            challenge = exc.headers.get("WWW-Authenticate", "")
            if exc.code == 401 and challenge.lower().startswith("bearer") and "Authorization" not in headers:
                headers["Authorization"] = "Bearer " + _token(challenge)
                continue
            detail = exc.read().decode("utf-8", "replace").strip()
            with contextlib.suppress(ValueError, AttributeError):
                errors = json.loads(detail).get("errors") or []
                detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or detail
            raise Failed(f"the registry {registry} says {exc.code} for {path}:{reference}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Failed(f"cannot reach the registry {registry} from the login node: {reason}") from None
    raise Failed(f"the registry {registry} refused an anonymous token for {path}")


def digest(ref, with_size=False):
    """The registry's digest of REF now (tags move), and with ``with_size`` the compressed size of its layers
    (of the linux/amd64 image of a multi-platform one); Failed with the registry's own words."""
    registry, path, tag = split_ref(ref)
    headers = {"Accept": ACCEPT}
    if tag.startswith("sha256:") and not with_size:
        return tag, 0
    found, body = _manifest(registry, path, tag, headers)
    if not with_size:
        return found, 0
    manifest = json.loads(body.decode())
    if "manifests" in manifest:  # an index: the manifest of this machine's platform
        chosen = [m for m in manifest["manifests"] if m.get("platform", {}).get("architecture") in ("amd64", None)]
        _, body = _manifest(registry, path, (chosen or manifest["manifests"])[0]["digest"], headers)
        manifest = json.loads(body.decode())
    return found, sum(layer.get("size", 0) for layer in manifest.get("layers", []))


def key_of(ref):
    """A file name for a ref: readable, and unique (a hash of the whole ref)."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in ref.split("://", 1)[-1])[:80]
    return safe + "-" + hashlib.sha256(ref.encode()).hexdigest()[:10]


def records(cache):
    folder = os.path.join(cache, "refs")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            try:
                with open(os.path.join(folder, name)) as f:
                    found = json.load(f)
            except (OSError, ValueError):
                continue
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
    os.makedirs(folder, mode=0o700, exist_ok=True)
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


def build(cache, ref, digest_, dest, script, extra_env):
    """Run SCRIPT to make ``dest`` unless it is there; record REF as the image at ``dest``."""
    name = os.path.basename(dest)
    with locked(cache, name):
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
        old = find(cache, ref) or {}
        rec = {"ref": ref, "digest": digest_, "path": dest, "size": size_of(dest), "pulled": now, "used": now}
        if old.get("path") == dest:
            rec["pulled"] = old.get("pulled", now)
        emit(write_record(cache, rec))


def ensure(cache, ref, suffix, script):
    known = find(cache, ref)
    try:
        digest_, _ = digest(ref)
    except Failed as exc:
        if known is None or not os.path.exists(known["path"]):
            raise
        print("{}; running the cached {}".format(exc, known["digest"][:19]), flush=True)
        return used(cache, known)
    if known is not None and known["digest"] == digest_ and os.path.exists(known["path"]):
        return used(cache, known)
    build(cache, ref, digest_, os.path.join(cache, digest_.replace(":", "-") + suffix), script, {})


def import_upload(cache, ref, digest_, suffix, upload, script):
    try:
        build(cache, ref, digest_, os.path.join(cache, digest_.replace(":", "-") + suffix), script,
              {"OFFLOAD_UPLOAD": upload})  # fmt: skip
    finally:
        with contextlib.suppress(OSError):
            os.remove(upload)


def remove(cache, wanted):
    all_records = list(records(cache))
    gone = [r for r in all_records if wanted in (r["key"], r["ref"], r["digest"], r["ref"].split("://")[-1])]
    if not gone:
        raise Failed(f"no cached image {wanted!r}: 'offload image ls' lists them")
    for rec in gone:
        os.remove(os.path.join(cache, "refs", rec["key"] + ".json"))
    still = {r["path"] for r in records(cache)}
    for rec in gone:
        if rec["path"] not in still and os.path.lexists(rec["path"]):
            shutil.rmtree(rec["path"]) if os.path.isdir(rec["path"]) else os.remove(rec["path"])
        emit(rec)


def prune(cache, days, limit):
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
    os.makedirs(os.path.join(cache, "refs"), mode=0o700, exist_ok=True)
    if mode == "digest":
        found, size = digest(argv[2], with_size=True)
        print(f"offload-digest {found} {size}")
    elif mode == "ensure":
        ensure(cache, argv[2], argv[3], argv[4])
    elif mode == "import":
        import_upload(cache, argv[2], argv[3], argv[4], argv[5], argv[6])
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
