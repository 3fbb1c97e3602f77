"""Unit tests for tests/support/certs.py: the test CA signs certificates that verify against it
(and not against another CA), fingerprints in both spellings, and `install` renames files into
place key first."""

from __future__ import annotations

import hashlib
import ssl
from pathlib import Path

from tests.support.certs import TestCA, install


def test_issued_certificates_chain_to_their_ca_only(tmp_path: Path) -> None:
    """A server and a client certificate load with their keys and verify against their CA;
    another CA's store does not hold that CA."""
    ca = TestCA(tmp_path / "a")
    server, client = ca.issue("server"), ca.issue("client", server=False)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server.cert_file, server.key_file)
    client_ctx = ca.client_context(client)
    assert client_ctx.verify_mode == ssl.CERT_REQUIRED and client_ctx.check_hostname
    assert [c["subject"] for c in client_ctx.get_ca_certs()] == [((("commonName", "test-ca"),),)]
    other = TestCA(tmp_path / "b", "other-ca")
    assert [c["subject"] for c in other.client_context().get_ca_certs()] == [
        ((("commonName", "other-ca"),),)]


def test_fingerprints_in_both_spellings(tmp_path: Path) -> None:
    """`sha256` is the lowercase hex SHA-256 of the DER certificate; `sha256_colons` the same
    in openssl's AB:CD:… form."""
    issued = TestCA(tmp_path).issue("x", server=False)
    der = ssl.PEM_cert_to_DER_cert(issued.cert_file.read_text())
    assert issued.sha256 == hashlib.sha256(der).hexdigest()
    assert issued.sha256_colons.replace(":", "").lower() == issued.sha256
    assert len(issued.sha256_colons.split(":")) == 32


def test_install_replaces_both_files_by_rename(tmp_path: Path) -> None:
    """`install` puts a certificate and key in place as new files (new inodes), leaving no
    temporary file behind."""
    ca = TestCA(tmp_path / "ca")
    first, second = ca.issue("first"), ca.issue("second")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    install(first, cert, key)
    inodes = (cert.stat().st_ino, key.stat().st_ino)
    install(second, cert, key)
    assert cert.read_bytes() == second.cert_file.read_bytes()
    assert key.read_bytes() == second.key_file.read_bytes()
    assert (cert.stat().st_ino, key.stat().st_ino) != inodes
    assert sorted(p.name for p in live.iterdir()) == ["tls.crt", "tls.key"]
