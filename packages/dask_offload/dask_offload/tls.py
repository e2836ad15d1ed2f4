"""Per-cluster temporary TLS credentials: one self-signed certificate and key, in memory, for every role.

``distributed.Security.temporary()`` makes an RSA-2048 key: 16-100 ms of the client's CPU (39 ms median on the
benchmark machine), spent in the cluster's constructor before any job is submitted, so on the path to the first
worker. A P-256 (ECDSA) key takes about 0.01 ms, and each TLS handshake's signature is cheaper too (the
scheduler signs once per worker and client that connects). The certificate has the same shape as distributed's
(self-signed, its own CA, host names not checked), so the launcher loads it as it loads any certificate.
"""

from __future__ import annotations

import datetime

import dask.config
from distributed.security import Security

# Compute nodes check the certificate's dates against their own clocks, which may lag the client's: a
# certificate valid only from "now" on the client can be "not yet valid" on such a node.
CLOCK_SKEW = datetime.timedelta(days=1)
LIFETIME = datetime.timedelta(days=365)  # as distributed's temporary certificates


def temporary_security() -> Security:
    """A :class:`~distributed.security.Security` with fresh in-memory credentials, encryption required.

    Where the user's Dask config restricts TLS ciphers (``distributed.comm.tls.ciphers``), the list may allow
    RSA certificates only (TLS 1.2 suites name the key type): distributed's own RSA credentials are made then."""
    if dask.config.get("distributed.comm.tls.ciphers", None):
        return Security.temporary()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]), critical=False)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + LIFETIME)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    roles = {f"tls_{role}_{kind}": value for role in ("client", "scheduler", "worker")
             for kind, value in (("cert", cert_pem), ("key", key_pem))}  # fmt: skip
    return Security(require_encryption=True, tls_ca_file=cert_pem, **roles)
