"""``reach``: jobs on compute nodes without outbound network use services on the user's side, through offload's
one SSH connection (a relay on the node, carried by a job step's stdio). The services here listen on this
machine's loopback, which the nodes cannot reach (asserted)."""

from __future__ import annotations

import datetime
import hashlib
import http.server
import os
import ssl
import subprocess
import sys
import threading

import pytest

import offload
from offload import JobSpec, JobState

OFFLOAD = [sys.executable, "-m", "offload.cli"]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._reply(f"hello {self.path}\n".encode())

    def do_POST(self):
        left, digest = int(self.headers["Content-Length"]), hashlib.sha256()
        while left:
            chunk = self.rfile.read(min(left, 1 << 20))
            digest.update(chunk)
            left -= len(chunk)
        self._reply(digest.hexdigest().encode())

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(context: ssl.SSLContext | None = None) -> tuple[http.server.ThreadingHTTPServer, int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


@pytest.fixture(scope="module")
def service():
    server, port = serve()
    yield f"http://127.0.0.1:{port}"
    server.shutdown()


def run(site, code: str, reach: dict[str, str], files: dict[str, bytes] | None = None, timeout: float = 300):
    job = site.submit(JobSpec(["python3", "-c", code], reach=reach, files=files or {}, name="reach"))
    status = job.wait(timeout=timeout)
    return job, status, "\n".join(job.logs())


def test_without_reach_the_node_cannot_reach_the_service(site, service):
    code = ("import sys, urllib.request\ntry:\n    urllib.request.urlopen(sys.argv[1], timeout=5)\n"
            "except OSError:\n    print('unreachable')\n")  # fmt: skip
    job = site.submit(JobSpec(["python3", "-c", code, service]))
    job.wait(timeout=120)
    assert "unreachable" in job.tail()


def test_many_requests_from_threads_and_a_large_upload(site, service):
    code = """
import hashlib, os, threading, urllib.request
base = os.environ["SERVICE"]
assert base.startswith("http://127.0.0.1:"), base  # the node's own loopback, where the relay listens
answers = []
def client(k):
    for i in range(25):
        answers.append(urllib.request.urlopen(f"{base}/{k}/{i}", timeout=60).read() == f"hello /{k}/{i}\\n".encode())
threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print("answered", len(answers), all(answers))
data = os.urandom(50 * 2**20)
request = urllib.request.Request(base + "/upload", data=data, method="POST")
print("upload intact", urllib.request.urlopen(request, timeout=300).read().decode() == hashlib.sha256(data).hexdigest())
"""
    _, status, log = run(site, code, {"SERVICE": service + "/"})
    assert status.state is JobState.COMPLETED, log
    assert "answered 200 True" in log
    assert "upload intact True" in log


def test_https_stays_end_to_end_through_the_nodes_proxy(site, tmp_path):
    """TLS with the real host name (SNI, certificate check) from the node to the service; only the job's
    targets are tunnelled."""
    ca_pem, cert_pem, key_pem = certificates("localhost")
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server, port = serve(context)
    try:
        code = """
import os, ssl, urllib.error, urllib.request
url = os.environ["SECURE"]
print("value", url, "proxy", os.environ["https_proxy"].startswith("http://127.0.0.1:"))
context = ssl.create_default_context(cafile="ca.pem")
print("answer", urllib.request.urlopen(url + "/tls", context=context, timeout=60).read().decode().strip())
try:
    urllib.request.urlopen("https://example.org/", timeout=20)
except urllib.error.URLError as exc:
    print("other hosts refused:", "403" in str(exc))
"""
        url = f"https://localhost:{port}"
        _, status, log = run(site, code, {"SECURE": url}, files={"ca.pem": ca_pem})
        assert status.state is JobState.COMPLETED, log
        assert f"value {url} proxy True" in log  # the URL is unchanged: TLS checks the real name
        assert "answer hello /tls" in log
        assert "other hosts refused: True" in log
    finally:
        server.shutdown()


def test_the_relay_comes_back_after_the_connection_is_cut(site, service):
    """The SSH connection drops mid-job: the job is not killed, offload reconnects and re-attaches the relay,
    and the job's requests carry on (a request made meanwhile waits briefly for the relay, then fails fast)."""
    code = """
import os, time, urllib.request
base, answered = os.environ["SERVICE"], 0
for i in range(40):
    try:
        urllib.request.urlopen(base + "/tick", timeout=30).read()
        answered += 1
        print("ok", flush=True)
    except OSError as exc:
        print("failed", exc, flush=True)
    time.sleep(0.5)
print("answered", answered, flush=True)
"""
    job = site.submit(JobSpec(["python3", "-c", code], reach={"SERVICE": service}, name="reach-cut"))
    carriers = site._relays.stats.get("carriers", 0)
    lines = []
    for line in job.logs(follow=True):
        lines.append(line)
        if lines.count("ok") == 3:  # the relay works: now cut the connection under it
            site.transport._conn.abort()
            break
    status = job.wait(timeout=240)
    log = "\n".join(job.logs())
    assert status.state is JobState.COMPLETED, log  # the job was not killed by the cut
    assert site._relays.stats["carriers"] >= carriers + 2, log  # a second carrier attached after the cut
    answered = int(log.split("answered ")[-1].split()[0])
    assert answered >= 35, log  # requests went on being answered after the cut


def test_a_detached_job_is_served_by_offload_relay(testsite_config, service):
    code = (
        "import os, urllib.request; print(urllib.request.urlopen(os.environ['SERVICE'] + '/late', timeout=60).read())"
    )
    submitted = subprocess.run([*OFFLOAD, "run", "--site", "testsite", "--detach", "--reach", "SERVICE",
                                "--", "python3", "-c", code], capture_output=True, text=True, timeout=120,
                               env={**os.environ, "SERVICE": service})  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    assert "offload relay" in submitted.stderr  # it says how to serve the relay
    job_id = submitted.stdout.strip()
    served = subprocess.run([*OFFLOAD, "relay", job_id], capture_output=True, text=True, timeout=240)
    assert served.returncode == 0, served.stderr
    assert "COMPLETED" in served.stderr
    log = subprocess.run([*OFFLOAD, "logs", job_id], capture_output=True, text=True, timeout=60).stdout
    assert "hello /late" in log


def test_reach_is_checked_before_anything_is_submitted(site):
    with pytest.raises(offload.ConfigError, match="port"):
        JobSpec(["true"], reach={"DB": "postgresql://db.example.org/x"})
    with pytest.raises(offload.ConfigError, match="neither a URL"):
        JobSpec(["true"], reach={"X": "not a url"})
    with pytest.raises(offload.ConfigError, match="several nodes"):
        JobSpec(["true"], reach={"X": "http://h:1"}, resources=offload.Resources(nodes=2))


def certificates(host: str) -> tuple[bytes, bytes, bytes]:
    """A CA and a server certificate for ``host`` (PEM), made with cryptography (asyncssh's dependency)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offload test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))  # fmt: skip
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .sign(ca_key, hashes.SHA256()))  # fmt: skip
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), cert.public_bytes(pem), key_pem
