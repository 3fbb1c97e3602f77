"""Certificates made in the test: the tools' throwaway CA (tools/pki.py, shared with the demo)
plus what only the tests need: a client context, an installer that renames files into place
like cert-manager, and the fingerprint a live server presents."""

from __future__ import annotations

import hashlib
import os
import ssl
from pathlib import Path

from tools.pki import CertificateAuthority, Issued

__all__ = ["Issued", "TestCA", "install", "served_certificate"]


class TestCA(CertificateAuthority):
    """The tools' CA (tools/pki.py) named `test-ca` unless told, with a client context for
    the tests' TLS clients."""

    __test__ = False  # not a pytest class

    def __init__(self, folder: Path, name: str = "test-ca") -> None:
        super().__init__(folder, name)

    def client_context(self, client: Issued | None = None) -> ssl.SSLContext:
        """A client context trusting this CA (hostname checked), presenting `client`."""
        ctx = ssl.create_default_context(cafile=str(self.cert_file))
        if client is not None:
            ctx.load_cert_chain(client.cert_file, client.key_file)
        return ctx


def install(src: Issued, cert_file: Path, key_file: Path) -> None:
    """Put `src` in place at `cert_file` / `key_file` the way cert-manager and kubelet do:
    each file written beside its target and renamed over it, the key first."""
    for source, target in ((src.key_file, key_file), (src.cert_file, cert_file)):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(source.read_bytes())
        os.replace(tmp, target)


def served_certificate(host: str, port: int, ca: TestCA) -> str:
    """SHA-256 of the certificate a TLS server on host:port presents to a new connection."""
    import socket

    ctx = ca.client_context()
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()
