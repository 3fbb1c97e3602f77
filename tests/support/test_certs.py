"""Unit tests for tests/support/certs.py: the test CA's client context trusts that CA only and
presents its client certificate, and `install` renames files into place key first (the CA
itself is tools/pki.py's, tested in tests/tools/test_pki.py)."""

from __future__ import annotations

import ssl
from pathlib import Path

from tests.support.certs import TestCA, install


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


def test_client_context_trusts_its_ca_only_and_presents_the_client(tmp_path: Path) -> None:
    """The client context checks hostnames, trusts the CA it came from (named `test-ca`
    unless told) and no other, and loads the client certificate it is given."""
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
