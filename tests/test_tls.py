"""Tests for gateway.tls: the server context built from the `tls:` files (every bad file a
config error naming its field), the certificate swapped for new handshakes while an open
connection keeps its own, the file watch (atomic renames, key first), and the client
certificate's fingerprint. Real handshakes on 127.0.0.1 with certificates made here."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization

from gateway.request_log import configure_logging, set_log_stream
from gateway.settings import ConfigError, TLSSettings
from gateway.tls import ServerTLS, cert_sha256, file_stamp, load_tls, peer_cert_sha256
from tests.support.certs import (
    TestCA,
    install,
    live_certificate,
    served_now,
)
from tests.support.gateway import LogCapture, poll

SOURCE = "gw.yaml"


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    set_log_stream(capture)
    configure_logging("info", "json")
    yield capture
    set_log_stream(None)
    configure_logging("info", "json")  # back to stdout


def _settings(cert: Path, key: Path, **more: object) -> TLSSettings:
    return TLSSettings.model_validate({"cert_file": str(cert), "key_file": str(key), **more})


def test_a_good_pair_loads_and_names_the_served_certificate(ca: TestCA, tmp_path: Path) -> None:
    """A matching certificate and key load; the fingerprint is that of the served certificate;
    no client certificate is asked for without a client CA."""
    server = ca.issue("server")
    loaded = load_tls(_settings(server.cert_file, server.key_file), SOURCE)
    assert loaded.sha256 == server.sha256
    assert loaded.context.verify_mode == ssl.CERT_NONE
    assert loaded.context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_ca_asks_for_a_certificate_and_require_demands_one(ca: TestCA) -> None:
    """With a client CA a certificate is asked for (optional); require_client_cert makes it
    required."""
    server = ca.issue("server")
    asked = load_tls(_settings(server.cert_file, server.key_file,
                               client_ca_file=str(ca.cert_file)), SOURCE)
    assert asked.context.verify_mode == ssl.CERT_OPTIONAL
    required = load_tls(_settings(server.cert_file, server.key_file,
                                  client_ca_file=str(ca.cert_file), require_client_cert=True),
                        SOURCE)
    assert required.context.verify_mode == ssl.CERT_REQUIRED


def _problem(tls: TLSSettings) -> str:
    with pytest.raises(ConfigError) as err:
        load_tls(tls, SOURCE)
    assert err.value.file == SOURCE
    return err.value.line()


def test_every_bad_file_is_a_config_error_naming_its_field(ca: TestCA, tmp_path: Path) -> None:
    """A missing or unreadable file, a file with no certificate or no key, a key of another
    certificate, an encrypted key and a client CA file with no CA are refused, each naming
    the field and the file."""
    server, other = ca.issue("server"), ca.issue("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a pem file\n")
    broken = tmp_path / "broken.crt"
    broken.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(server.key_file.read_bytes(), None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret-pass")))
    missing = tmp_path / "missing.crt"
    cases = [
        (_settings(missing, server.key_file), "tls.cert_file", "cannot read"),
        (_settings(tmp_path, server.key_file), "tls.cert_file", "cannot read"),  # a folder
        (_settings(garbage, server.key_file), "tls.cert_file", "no PEM certificate"),
        (_settings(broken, server.key_file), "tls.cert_file", "not a valid certificate"),
        (_settings(server.cert_file, missing), "tls.key_file", "cannot read"),
        (_settings(server.cert_file, server.cert_file), "tls.key_file", "no PEM private key"),
        (_settings(server.cert_file, other.key_file), "tls.key_file",
         "does not match the certificate"),
        (_settings(server.cert_file, encrypted), "tls.key_file", "encrypted"),
        (_settings(server.cert_file, server.key_file, client_ca_file=str(garbage)),
         "tls.client_ca_file", "no usable CA certificate"),
        (_settings(server.cert_file, server.key_file, client_ca_file=str(missing)),
         "tls.client_ca_file", "cannot read"),
    ]
    for tls, field, reason in cases:
        line = _problem(tls)
        assert line.startswith(f"{SOURCE}: {field}: "), line
        assert reason in line, line
        assert "secret-pass" not in line


def test_a_stamp_changes_with_a_rename_and_marks_a_missing_file(ca: TestCA,
                                                                tmp_path: Path) -> None:
    """Renaming a new file over the certificate changes the stamp; a missing file has a stamp
    of its own."""
    _, cert, key = live_certificate(ca, tmp_path)
    tls = _settings(cert, key)
    before = file_stamp(tls)
    install(ca.issue("second", folder=tmp_path / "made"), cert, key)
    after = file_stamp(tls)
    assert before != after and before[2] is None
    key.unlink()
    assert file_stamp(tls)[1] == (-1, -1, -1, -1)


def test_no_peer_certificate_without_tls() -> None:
    """Plain HTTP (no transport, or one without an SSL object) has no client certificate."""
    assert peer_cert_sha256(None) is None

    class Plain:
        def get_extra_info(self, name: str) -> None:
            return None

    assert peer_cert_sha256(Plain()) is None
    assert cert_sha256(b"x") == (
        "2d711642b726b04401627ca9fbac32f5c8530fb1903cc4db02258717921a4881")


class _Echo(asyncio.Protocol):
    """Answers each line with the SHA-256 of the client certificate it saw (or "none")."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.peer = peer_cert_sha256(transport) or "none"

    def data_received(self, data: bytes) -> None:
        assert isinstance(self.transport, asyncio.WriteTransport)
        self.transport.write(self.peer.encode() + b"\n")


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[object]:
    servers: list[asyncio.Server] = []

    async def start(tls: ServerTLS) -> int:
        srv = await asyncio.get_running_loop().create_server(_Echo, "127.0.0.1", 0,
                                                             ssl=tls.context)
        servers.append(srv)
        port: int = srv.sockets[0].getsockname()[1]
        return port

    yield start
    for srv in servers:
        srv.close()


async def test_install_serves_new_handshakes_and_an_open_connection_keeps_working(
        ca: TestCA, tmp_path: Path, serve: object, logs: LogCapture) -> None:
    """After `install`, a new connection gets the new certificate while a connection opened
    before keeps working on its own; `tls_certificate_loaded` names each certificate."""
    first, cert, key = live_certificate(ca, tmp_path)
    tls = ServerTLS.open(_settings(cert, key), SOURCE)
    port = await serve(tls)  # type: ignore[operator]
    reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                   ssl=ca.client_context())
    writer.write(b"hello\n")
    assert await reader.readline() == b"none\n"
    assert await served_now(port, ca) == first.sha256
    second = ca.issue("second", folder=tmp_path / "made")
    install(second, cert, key)
    tls.install(load_tls(_settings(cert, key), SOURCE))
    assert await served_now(port, ca) == second.sha256
    writer.write(b"again\n")  # the connection made before the swap
    assert await reader.readline() == b"none\n"
    ssl_object = writer.get_extra_info("ssl_object")
    assert ssl_object is not None
    assert cert_sha256(ssl_object.getpeercert(binary_form=True)) == first.sha256
    writer.close()
    loaded = [e["sha256"] for e in logs.events("tls_certificate_loaded")]
    assert loaded == [first.sha256, second.sha256]


async def test_client_certificate_is_verified_and_its_fingerprint_seen(
        ca: TestCA, tmp_path: Path, serve: object) -> None:
    """With a client CA, a certificate it signed is seen by fingerprint, a connection without
    one is served (optional), and a certificate of another CA fails the handshake; after a
    swap to require_client_cert, a connection without one fails too."""
    server = ca.issue("server")
    client = ca.issue("client", server=False)
    stranger_ca = TestCA(tmp_path / "stranger", "stranger-ca")
    stranger = stranger_ca.issue("stranger", server=False)
    tls = ServerTLS.open(_settings(server.cert_file, server.key_file,
                                   client_ca_file=str(ca.cert_file)), SOURCE)
    port = await serve(tls)  # type: ignore[operator]

    async def seen(ctx: ssl.SSLContext) -> bytes:
        """What the server saw; b"" when it refused the handshake (with TLS 1.3 the client
        may learn it only once it reads)."""
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        except (ssl.SSLError, ConnectionError):
            return b""
        try:
            writer.write(b"who\n")
            return await reader.readline()
        except (ssl.SSLError, ConnectionError):
            return b""
        finally:
            writer.close()

    assert await seen(ca.client_context(client)) == client.sha256.encode() + b"\n"
    assert await seen(ca.client_context()) == b"none\n"
    foreign = ca.client_context()
    foreign.load_cert_chain(stranger.cert_file, stranger.key_file)
    assert await seen(foreign) == b""
    tls.install(load_tls(_settings(server.cert_file, server.key_file,
                                   client_ca_file=str(ca.cert_file),
                                   require_client_cert=True), SOURCE))
    assert await seen(ca.client_context(client)) == client.sha256.encode() + b"\n"
    assert await seen(ca.client_context()) == b""


async def test_check_follows_renamed_files_and_refuses_a_bad_pair(
        ca: TestCA, tmp_path: Path, serve: object, logs: LogCapture) -> None:
    """`check` serves files renamed into place; a key renamed without its certificate (or any
    bad pair) is refused and logged once while the certificate in service stays, and the
    certificate renamed after it completes the swap."""
    first, cert, key = live_certificate(ca, tmp_path)
    tls = ServerTLS.open(_settings(cert, key), SOURCE)
    port = await serve(tls)  # type: ignore[operator]
    await tls.check()  # nothing changed
    assert await served_now(port, ca) == first.sha256
    assert len(logs.events("tls_certificate_loaded")) == 1
    second = ca.issue("second", folder=tmp_path / "made")
    install(second, cert, key)
    await tls.check()
    assert await served_now(port, ca) == second.sha256
    third = ca.issue("third", folder=tmp_path / "made")
    key.write_bytes(third.key_file.read_bytes())  # the key alone: the pair does not match
    await tls.check()
    await tls.check()
    [rejected] = logs.events("tls_certificate_rejected")
    assert "tls.key_file" in rejected["reason"] and "does not match" in rejected["reason"]
    assert rejected["sha256"] == second.sha256 and rejected["level"] == "error"
    assert await served_now(port, ca) == second.sha256
    install(third, cert, key)
    await tls.check()
    assert await served_now(port, ca) == third.sha256
    assert len(logs.events("tls_certificate_rejected")) == 1


async def test_check_runs_as_a_loop_step_without_raising(ca: TestCA, tmp_path: Path,
                                                         logs: LogCapture) -> None:
    """A file removed under the watch is a rejection logged once, never an exception that
    would end the loop; the certificate in service stays."""
    first, cert, key = live_certificate(ca, tmp_path)
    tls = ServerTLS.open(_settings(cert, key), SOURCE)
    cert.unlink()
    await tls.check()
    await poll(lambda: logs.events("tls_certificate_rejected"))
    [rejected] = logs.events("tls_certificate_rejected")
    assert "tls.cert_file" in rejected["reason"] and "cannot read" in rejected["reason"]
    assert tls.current.sha256 == first.sha256
