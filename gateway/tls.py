"""TLS on the proxy listener (docs/architecture.md §3, "TLS and client certificates"): the
server context built from the `tls:` settings, swapped for new handshakes on SIGHUP and when
the files change (as cert-manager rotates them) with no connection dropped, and the SHA-256
fingerprint of a connection's client certificate, the input of a reseller's
`client_cert_sha256` binding (gateway/decision.py).

How the swap works: the listener serves one `SSLContext` for its whole life
(`ServerTLS.context`). Its `sni_callback`, which OpenSSL calls on every ClientHello (with or
without a server name), moves the new connection onto the context in service. A connection
keeps the context it shook hands with, so replacing the one in service changes what new
connections get and leaves every open connection alone. This needs nothing of the transport:
it works the same on asyncio's and uvloop's TLS, and wherever the listener's context is used.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.log import logger
from gateway.settings import ConfigError, TLSSettings

#: A changed file must hold still this long before it is read: cert-manager and kubelet rename
#: the key and the certificate one after the other, and the pair is only whole after both.
SETTLE_S = 1.0

_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----")
_PEM_KEY = re.compile(r"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----")

#: What the files looked like when read: (device, inode, mtime ns, size) of each, or None.
Stamp = tuple[tuple[int, int, int, int] | None, ...]


def cert_sha256(der: bytes) -> str:
    """The fingerprint a policy binds: SHA-256 of the DER certificate, lowercase hex."""
    return hashlib.sha256(der).hexdigest()


def peer_cert_sha256(transport: Any) -> str | None:
    """The fingerprint of the certificate the client presented on this connection (verified
    against `tls.client_ca_file` during the handshake); None on plain HTTP or without one."""
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return None if der is None else cert_sha256(der)


def file_stamp(tls: TLSSettings) -> Stamp:
    """The stamp of the certificate, key and client CA files (following symlinks, as a
    Kubernetes secret volume swaps its `..data` link): any rename or write changes it."""
    out: list[tuple[int, int, int, int] | None] = []
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file):
        if path is None:
            out.append(None)
            continue
        try:
            st = os.stat(path)
        except OSError:
            out.append((-1, -1, -1, -1))
            continue
        out.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True, slots=True, eq=False)
class LoadedTLS:
    """A server context built from the files of `settings`, and what it was built from."""

    settings: TLSSettings
    context: ssl.SSLContext
    stamp: Stamp
    sha256: str  # of the served (first) certificate of cert_file

    def describe(self) -> dict[str, Any]:
        """The fields of `tls_certificate_loaded` (paths and fingerprints, nothing secret)."""
        s = self.settings
        return {"cert_file": s.cert_file, "key_file": s.key_file, "sha256": self.sha256,
                "client_ca_file": s.client_ca_file,
                "require_client_cert": s.require_client_cert}


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> str:
    # Called by OpenSSL only for an encrypted key; the gateway has no passphrase to give (and
    # OpenSSL's default would ask on a terminal).
    raise _EncryptedKey


def _read(path: str, source: str, field: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise ConfigError(source, field, f"cannot read {path}: "
                          f"{exc.strerror or exc}") from None


def _ssl_reason(exc: OSError) -> str:
    """Why a TLS file was refused: OpenSSL's reason, readable; an OS error's text."""
    if isinstance(exc, ssl.SSLError):
        return (exc.reason or exc.strerror or str(exc)).replace("_", " ").lower()
    return exc.strerror or str(exc)


def load_tls(tls: TLSSettings, source: str) -> LoadedTLS:
    """Build the server context of `tls` (blocking: file reads). Raises ConfigError naming
    `source` (the config file) and the field, with every problem found: a file missing or
    unreadable, no PEM certificate in `cert_file`, no usable key in `key_file` (an encrypted
    one included), a key that does not match the certificate, no usable CA in
    `client_ca_file`."""
    stamp = file_stamp(tls)  # before reading: a change while reading is seen next time
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    errors: list[ConfigError] = []
    served = ""
    try:
        served = _load_pair(ctx, tls, source)
    except ConfigError as exc:
        errors.append(exc)
    if tls.client_ca_file is not None:
        try:
            _load_client_ca(ctx, tls.client_ca_file, source)
        except ConfigError as exc:
            errors.append(exc)
        # Asked for on every handshake; required only with require_client_cert. A presented
        # certificate must chain to this CA, or the handshake fails.
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    if errors:
        raise ConfigError.of(errors)
    return LoadedTLS(tls, ctx, stamp, served)


def _load_pair(ctx: ssl.SSLContext, tls: TLSSettings, source: str) -> str:
    """Load the certificate chain and its key into `ctx`; the served certificate's
    fingerprint."""
    cert_text = _read(tls.cert_file, source, "tls.cert_file")
    blocks = _PEM_CERT.findall(cert_text)
    if not blocks:
        raise ConfigError(source, "tls.cert_file", f"{tls.cert_file}: no PEM certificate "
                          "in it (-----BEGIN CERTIFICATE-----)")
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cadata="\n".join(blocks))
    except ssl.SSLError as exc:
        raise ConfigError(source, "tls.cert_file", f"{tls.cert_file}: not a valid "
                          f"certificate ({_ssl_reason(exc)})") from None
    served = cert_sha256(ssl.PEM_cert_to_DER_cert(blocks[0]))
    key_text = _read(tls.key_file, source, "tls.key_file")
    if _PEM_KEY.search(key_text) is None:
        raise ConfigError(source, "tls.key_file", f"{tls.key_file}: no PEM private key in it")
    try:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(source, "tls.key_file", f"{tls.key_file}: the key is encrypted; "
                          "the gateway needs it unencrypted (protect the file instead)"
                          ) from None
    except OSError as exc:  # ssl.SSLError is an OSError too
        if isinstance(exc, ssl.SSLError) and exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(source, "tls.key_file", f"{tls.key_file} does not match the "
                              f"certificate in {tls.cert_file}") from None
        reason = _ssl_reason(exc)
        raise ConfigError(source, "tls.key_file", f"{tls.key_file}: not a usable private "
                          f"key ({reason})") from None
    return served


def _load_client_ca(ctx: ssl.SSLContext, path: str, source: str) -> None:
    _read(path, source, "tls.client_ca_file")
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        reason = _ssl_reason(exc)
        raise ConfigError(source, "tls.client_ca_file", f"{path}: no usable CA certificate "
                          f"({reason})") from None


class ServerTLS:
    """The proxy listener's TLS. `context` is the one SSLContext the listener serves; every
    new handshake is moved onto the certificate in service (`current`), so `install` changes
    what new connections get while open ones keep theirs.

    `check` (a background loop, every `tls.reload_interval_s`) reloads the files when they
    change; the config reload installs what it loaded itself. A certificate that fails to
    load never replaces the one in service: it is logged (`tls_certificate_rejected`) once
    per change of the files."""

    def __init__(self, loaded: LoadedTLS, source: str) -> None:
        self.source = source
        self.current = loaded
        self.context = loaded.context
        self.context.sni_callback = self._switch
        self._generation = 0
        self._refused: Stamp | None = None
        logger().info("tls_certificate_loaded", **loaded.describe())

    @classmethod
    def open(cls, tls: TLSSettings, source: str) -> ServerTLS:
        """Load the files (ConfigError as `load_tls`) and serve them."""
        return cls(load_tls(tls, source), source)

    def _switch(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                ctx: ssl.SSLContext) -> None:
        current = self.current.context
        if conn.context is not current:
            conn.context = current

    def install(self, loaded: LoadedTLS, source: str | None = None) -> None:
        """Serve `loaded` to every handshake from now on."""
        self._generation += 1
        self._refused = None
        if source is not None:
            self.source = source
        self.current = loaded
        # Whether a client certificate is asked for is decided when a connection is created,
        # from the listener's context, before the handshake reaches `_switch`.
        self.context.verify_mode = loaded.context.verify_mode
        logger().info("tls_certificate_loaded", **loaded.describe())

    async def check(self) -> None:
        """One look at the files: when they changed (and then held still for SETTLE_S), load
        them and serve the result, or log why not and keep the certificate in service."""
        try:
            await self._check()
        except Exception as exc:  # a background step never ends its loop
            logger().error("tls_certificate_rejected", reason=f"{type(exc).__name__}: {exc}",
                           sha256=self.current.sha256)

    async def _check(self) -> None:
        settings = self.current.settings
        stamp = await asyncio.to_thread(file_stamp, settings)
        if stamp in (self.current.stamp, self._refused):
            return
        await asyncio.sleep(SETTLE_S)
        if await asyncio.to_thread(file_stamp, settings) != stamp:
            return  # still being replaced: looked at again next time
        generation = self._generation
        try:
            loaded = await asyncio.to_thread(load_tls, settings, self.source)
        except ConfigError as exc:
            if generation == self._generation:
                self._refused = stamp
                logger().error("tls_certificate_rejected", reason=str(exc),
                               sha256=self.current.sha256)
            return
        if generation == self._generation:  # a config reload installed nothing meanwhile
            self.install(loaded)
