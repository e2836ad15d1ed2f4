"""The cluster's temporary TLS credentials: a P-256 key (cheap to make, before any job is submitted), usable by
distributed's own TLS contexts, and distributed's RSA ones where the user restricted the TLS ciphers."""

from __future__ import annotations

import ssl

import dask.config
import pytest

pytest.importorskip("distributed")
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from dask_offload.tls import temporary_security


def test_one_p256_certificate_for_every_role_and_encryption_required():
    sec = temporary_security()
    assert sec.require_encryption
    assert isinstance(load_pem_private_key(sec.tls_worker_key.encode(), None), ec.EllipticCurvePrivateKey)
    assert sec.tls_ca_file == sec.tls_client_cert == sec.tls_scheduler_cert == sec.tls_worker_cert
    assert sec.tls_client_key == sec.tls_scheduler_key == sec.tls_worker_key


def test_a_tls_handshake_with_it_succeeds():
    sec = temporary_security()
    server = sec.get_listen_args("scheduler")["ssl_context"]
    client = sec.get_connection_args("worker")["ssl_context"]
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, end, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
    assert done == {"c": True, "s": True}
    assert s.getpeercert()  # the worker showed the cluster's certificate, as the scheduler requires


def test_restricted_ciphers_keep_distributeds_rsa_credentials():
    with dask.config.set({"distributed.comm.tls.ciphers": "ECDHE-RSA-AES256-GCM-SHA384"}):
        sec = temporary_security()
    assert isinstance(load_pem_private_key(sec.tls_worker_key.encode(), None), rsa.RSAPrivateKey)
