"""Certificates made in the test: the tools' throwaway CA (tools/pki.py, shared with the demo)
plus what only the tests need: a client context, an installer that renames files into place
like cert-manager, a certificate installed where a gateway's `tls:` section reads it, and the
fingerprint a live server presents."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
from pathlib import Path

from tools.pki import CertificateAuthority, Issued

__all__ = ["Issued", "TestCA", "install", "live_certificate", "served_certificate", "served_now"]


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


def live_certificate(ca: TestCA, tmp_path: Path) -> tuple[Issued, Path, Path]:
    """A server certificate `first` installed at live/tls.crt and live/tls.key under
    `tmp_path`: (it, the certificate file, the key file)."""
    first = ca.issue("first", folder=tmp_path / "made")
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    install(first, cert, key)
    return first, cert, key


def served_certificate(host: str, port: int, ca: TestCA) -> str:
    """SHA-256 of the certificate a TLS server on host:port presents to a new connection."""
    import socket

    ctx = ca.client_context()
    with socket.create_connection((host, port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


async def served_now(port: int, ca: TestCA) -> str:
    """`served_certificate` of 127.0.0.1:port, off the event loop."""
    return await asyncio.to_thread(served_certificate, "127.0.0.1", port, ca)
