"""Unit tests for tools/pki.py: the CA signs server and client certificates that chain to it
(and not to another CA), with keys readable by their owner only and fingerprints in both
spellings."""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tools.pki import CertificateAuthority


def test_issued_certificates_chain_to_their_ca_only(tmp_path: Path) -> None:
    """A server certificate (for 127.0.0.1, ::1 and localhost) and a client certificate verify
    against the CA that signed them and not against another; their keys match and are
    0600."""
    ca = CertificateAuthority(tmp_path / "a", "one-ca")
    other = CertificateAuthority(tmp_path / "b", "other-ca")
    server, client = ca.issue("server"), ca.issue("client", server=False)
    for leaf in (server, client):
        leaf.cert.verify_directly_issued_by(ca.cert)
        with pytest.raises(ValueError):
            leaf.cert.verify_directly_issued_by(other.cert)
        assert oct(leaf.key_file.stat().st_mode & 0o777) == "0o600"
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(server.cert_file, server.key_file)
    san = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    usage = client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ca.cert_file == tmp_path / "a" / "one-ca.crt"


def test_fingerprints_in_both_spellings(tmp_path: Path) -> None:
    """`sha256` is the lowercase hex SHA-256 of the DER certificate; `sha256_colons` the same
    in openssl's AB:CD:… form."""
    issued = CertificateAuthority(tmp_path, "ca").issue("x", server=False)
    der = ssl.PEM_cert_to_DER_cert(issued.cert_file.read_text())
    assert issued.sha256 == hashlib.sha256(der).hexdigest()
    assert issued.sha256_colons.replace(":", "").lower() == issued.sha256
    assert len(issued.sha256_colons.split(":")) == 32


def test_the_ca_signs_and_a_leaf_does_not(tmp_path: Path) -> None:
    """The CA certificate is self-issued, a critical CA that may sign certificates, valid two
    days; a leaf is no CA, issued by the CA's name, valid one day; both are valid from a
    little before now."""
    ca = CertificateAuthority(tmp_path, "ca")
    leaf = ca.issue("leaf")
    basic = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.cert.issuer == ca.cert.subject
    assert not leaf.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.cert.issuer == ca.cert.subject
    for cert, days in ((ca.cert, 2), (leaf.cert, 1)):
        valid = cert.not_valid_after_utc - cert.not_valid_before_utc
        assert valid == dt.timedelta(days=days, minutes=5)
        assert cert.not_valid_before_utc < dt.datetime.now(dt.UTC)
