"""A throwaway certificate authority (cryptography, EC P-256) that signs server and client
certificates, written as PEM files the gateway's `tls:` section and its clients read.

The demo's edge section and the tests' CA (tests/support/certs.py) both build on it, so the
certificates they make are made one way. Nothing here touches the network or a trust store.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: Backdating, so a clock a little behind the signer's still accepts a fresh certificate.
_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class Issued:
    """A certificate and its key, as PEM files."""

    cert_file: Path
    key_file: Path
    cert: x509.Certificate

    @property
    def sha256(self) -> str:
        """SHA-256 of the DER certificate, lowercase hex (the policy's `client_cert_sha256`)."""
        return hashlib.sha256(self.cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    @property
    def sha256_colons(self) -> str:
        """The same fingerprint as `openssl x509 -fingerprint -sha256` prints it: AB:CD:…"""
        return ":".join(self.sha256[i:i + 2] for i in range(0, 64, 2)).upper()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int,
             ca: bool) -> x509.CertificateBuilder:
    """What every certificate here has: subject, issuer, public key, a random serial, valid
    from a little before now for `days` days, and whether it is a CA (critical)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


class CertificateAuthority:
    """A CA living in `folder`: `<name>.crt` is what clients (and the gateway's
    `tls.client_ca_file`) trust."""

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.cert = (
            _builder(name, _name(name), self._key, days=2, ca=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_file = folder / f"{name}.crt"
        _write_cert(self.cert_file, self.cert)

    def issue(self, name: str, *, server: bool = True, folder: Path | None = None
              ) -> Issued:
        """A leaf certificate for `name` (a server one valid for 127.0.0.1, ::1 and
        localhost; else a client one) with its key, as `<name>.crt` / `<name>.key`, the key
        readable by its owner only."""
        where = folder or self.folder
        where.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        builder = _builder(name, self.cert.subject, key, days=1, ca=False).add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
                x509.DNSName("localhost")]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_file, key_file = where / f"{name}.crt", where / f"{name}.key"
        _write_cert(cert_file, cert)
        key_file.write_bytes(_key_pem(key))
        os.chmod(key_file, 0o600)
        return Issued(cert_file, key_file, cert)
