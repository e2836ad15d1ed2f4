"""Images on the test site: a registry image pulled once on the login node (the site's real OCI registry,
which compute nodes cannot reach), and an image made here pushed over the site's SSH connection, then run by a
job, by ``offload jupyter`` and by a Dask worker."""

import contextlib
import hashlib
import io
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import uuid

import pytest

import offload
from offload import _loop

from .conftest import STATE, queued_jobs
from .test_jupyter import run_cell

OFFLOAD = [sys.executable, "-m", "offload.cli"]
REGISTRY = os.environ.get("OFFLOAD_TESTSITE_REGISTRY", "10.231.77.1:5000")
REF = f"docker://{REGISTRY}/offload/test:1"
REGISTRY_LOG = STATE / "registry" / "registry.log"
MARKER = f"offload custom image {uuid.uuid4().hex[:8]}"


def cli(*args, timeout=600):
    return subprocess.run([*OFFLOAD, *args], capture_output=True, text=True, timeout=timeout)


def blob_downloads() -> int:
    """Layer and config downloads the registry has served (its own access log)."""
    return len(re.findall(r'"GET /v2/offload/test/blobs/sha256:[0-9a-f]+ HTTP/1\.1" 200', REGISTRY_LOG.read_text()))


def forget(site, image):
    with contextlib.suppress(offload.ImageError):
        site.images.remove(image)


def test_nodes_cannot_reach_the_registry_and_the_login_node_can(site):
    job = site.submit(offload.JobSpec(["python3", "-c", textwrap.dedent(f"""
        import socket
        try:
            socket.create_connection(("{REGISTRY.split(':')[0]}", {REGISTRY.split(':')[1]}), timeout=5)
            print("reached")
        except OSError as exc:
            print("refused", exc)
    """)]))  # fmt: skip
    job.wait(timeout=120)
    assert job.output().decode().startswith("refused")
    host, port = REGISTRY.split(":")
    login = site.transport_run(["python3", "-c", f"import socket; socket.create_connection(('{host}', {port}), 5)"
                                "; print('reached')"])  # fmt: skip
    assert login.strip() == "reached"


def test_pulled_once_then_many_jobs_from_two_clients_run_from_the_cache(site, site_user, tmp_path):
    forget(site, REF)
    before = blob_downloads()
    # Two clients at once, four jobs each, and nothing cached: the lock on the site lets one of them pull.
    client = tmp_path / "client.py"
    client.write_text(
        textwrap.dedent(f"""
        import offload
        site = offload.load_site("testsite")
        jobs = site.submit_many([offload.JobSpec(["sh", "-c", "cat /etc/debian_version"], image={REF!r})] * 4)
        for job in jobs:
            status = job.wait(timeout=300)
            print(status.state.value, job.output().decode().strip())
    """)
    )
    procs = [subprocess.Popen([sys.executable, str(client)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 4 and all(line.startswith("COMPLETED 12.") for line in lines), out
    pulled = blob_downloads() - before
    # one pull: ch-image's config and layer, and the login node's one read of the config (ENTRYPOINT, CMD)
    assert pulled == 3, f"the registry served {pulled} blobs: one pull is its config and layer, and one config read"
    assert sum("waiting for another pull" in err for _, err in results) <= 1
    # `offload image pull` now finds it cached; `image ls` shows the registry's digest
    again = cli("image", "pull", REF, "--site", "testsite")
    assert again.returncode == 0, again.stderr
    listed = cli("image", "ls", "--site", "testsite")
    digest = again.stdout.split()[1]
    assert digest.startswith("sha256:") and REF in listed.stdout and digest[:19] in listed.stdout
    assert blob_downloads() - before == pulled  # found in the cache: nothing more from the registry
    # where the image is: in the cache under the site's work dir, a directory ch-run starts
    cached = next(image for image in site.images.list() if image.ref == REF)
    assert cached.digest == digest and cached.path.startswith(site.workdir() + "/images/sha256-")
    assert queued_jobs(site_user) == []


def test_a_missing_tag_fails_before_anything_is_queued(site, site_user):
    records_before = len(site.records(limit=100000))
    done = cli("run", "--site", "testsite", "--image", f"docker://{REGISTRY}/offload/test:no-such-tag", "--", "true")
    assert done.returncode == 2
    assert "MANIFEST_UNKNOWN" in done.stderr and "offload/test:no-such-tag" in done.stderr, done.stderr
    assert len(site.records(limit=100000)) == records_before
    assert queued_jobs(site_user) == []
    unknown = cli("run", "--site", "testsite", "--image", "never-pushed", "--", "true")
    assert unknown.returncode == 2 and "offload image push PATH --name never-pushed" in unknown.stderr


@pytest.fixture(scope="module")
def custom_image(tmp_path_factory):
    """An image made on the client: the site's default image (Python, Jupyter, distributed) plus a marker
    file, as a rootfs tarball; pushed once for the tests below."""
    root = (STATE / "images" / "default").resolve()
    tarball = tmp_path_factory.mktemp("image") / "custom-rootfs.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as tar:
        tar.add(root, arcname=".", filter=lambda m: None if m.isdev() else m)
        info = tarfile.TarInfo("./etc/offload-marker")
        info.size = len(MARKER.encode())
        tar.addfile(info, io.BytesIO(MARKER.encode()))
    name = f"custom-{uuid.uuid4().hex[:6]}"
    pushed = cli("image", "push", str(tarball), "--name", name, "--site", "testsite")
    assert pushed.returncode == 0, pushed.stderr
    assert "sent" in pushed.stderr and f"use --image {name}" in pushed.stderr  # progress on the way
    yield name
    cli("image", "rm", name, "--site", "testsite")


def test_a_job_runs_in_a_pushed_image(custom_image, site):
    job = site.submit(offload.JobSpec(["cat", "/etc/offload-marker"], image=custom_image))
    assert job.wait(timeout=120).exit_code == 0
    assert job.output().decode().strip() == MARKER
    ran = cli("run", "--site", "testsite", "--image", custom_image, "--", "cat", "/etc/offload-marker")
    assert ran.returncode == 0 and ran.stdout.strip() == MARKER, ran.stderr


def test_jupyter_runs_in_a_pushed_image(custom_image, site_user):
    proc = subprocess.Popen([*OFFLOAD, "jupyter", "--site", "testsite", "--image", custom_image, "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        url = proc.stdout.readline().strip()
        assert "/lab?token=" in url, proc.stderr.read()
        base, token = url.split("/lab?token=")
        assert run_cell(base, token, "print(open('/etc/offload-marker').read())").strip() == MARKER
    finally:
        proc.send_signal(2)
        proc.communicate(timeout=60)
    assert queued_jobs(site_user, "jupyter") == []


def test_a_dask_worker_runs_in_a_pushed_image(custom_image, site_user):
    from distributed import Client

    from dask_offload import OffloadCluster

    def marker():
        return open("/etc/offload-marker").read()

    name = f"img-{uuid.uuid4().hex[:6]}"
    with OffloadCluster(site="testsite", image=custom_image, n_workers=1, memory="1GiB", name=name) as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(1, timeout=180)
            assert client.submit(marker, pure=False).result(timeout=60) == MARKER
    assert queued_jobs(site_user, name) == []


def test_an_interrupted_push_carries_on_where_it_stopped(site, tmp_path):
    """The upload goes to a file named after its content, so pushing the same image again sends only the rest."""
    blob = tmp_path / "big.tar.gz"
    with tarfile.open(blob, "w:gz", compresslevel=0) as tar:
        data = os.urandom(40 << 20)
        info = tarfile.TarInfo("./etc/blob")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    remote = f"{site.workdir()}/images/uploads/{digest}.tar.gz"
    site.transport_run(["mkdir", "-p", remote.rsplit("/", 1)[0]])
    with blob.open("rb") as f:  # what an interrupted push leaves behind: the first 24 MiB
        _loop.run(site.transport.write_file(remote, f.read(24 << 20)))
    sent: list[int] = []
    _loop.run(site.transport.put(str(blob), remote, resume=True, progress=lambda done, total: sent.append(done)))
    assert sent[0] >= 16 << 20, f"the part already there was sent again: {sent[:3]}"
    assert site.transport_run(["sha256sum", remote]).split()[0] == digest
    site.transport_run(["rm", "-f", remote])
    pushed = site.images.push(blob, "resumed")
    assert pushed.size >= 40 << 20
    assert site.images.resolve("resumed") == pushed.path
    site.images.remove("resumed")
