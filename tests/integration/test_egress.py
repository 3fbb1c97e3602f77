"""Egress to the upstream: its TLS certificate verified against `upstream.ca_file` (a CA made
with the openssl CLI, a stand-in upstream speaking HTTPS), and `upstream.trust_env` sending
the traffic through HTTPS_PROXY (a small CONNECT proxy on real sockets) unless NO_PROXY names
the upstream."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.integration.test_lifecycle import OPEN_POLICY
from tests.support.cli import code_of, send
from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
              "all_proxy", "NO_PROXY", "no_proxy")


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl CLI is needed to make test certificates"
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`ca` and `other-ca`, and a server certificate for 127.0.0.1 that `ca` signed."""
    d = tmp_path_factory.mktemp("egress-tls")
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
                 "-subj", f"/CN=egress {name}", cwd=d)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=upstream", cwd=d)
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "server.ext",
             cwd=d)
    return d


@pytest_asyncio.fixture
async def tls_upstream(certs: Path) -> AsyncIterator[FakeUpstream]:
    """The stand-in upstream on HTTPS with the certificate `ca` signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(certs / "server.crt", certs / "server.key")
    async with FakeUpstream(ssl_context=ctx) as fake:
        yield fake


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The proxy variables unset, whatever the machine has; tests set their own."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    yield monkeypatch


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1: records each tunnel's target, then relays bytes."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ")
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while chunk := await src.read(65536):
            dst.write(chunk)
            await dst.drain()
    finally:
        dst.close()


async def test_upstream_verified_against_ca_file(tmp_path: Path, certs: Path,
                                                 tls_upstream: FakeUpstream) -> None:
    """With `upstream.ca_file` naming the CA that signed the upstream's certificate, requests
    reach the HTTPS upstream; the path in the config is relative to the config file."""
    shutil.copy(certs / "ca.crt", tmp_path / "upstream-ca.pem")
    async with running_gateway(tmp_path, tls_upstream.url, OPEN_POLICY,
                               upstream={"ca_file": "upstream-ca.pem"}) as gw:
        _, key = await gw.issue_key("direct")
        status, body, _ = await send(gw.url, key)
        assert status == 200, body
        assert len(tls_upstream.requests) == 1


@pytest.mark.parametrize("ca", [None, "other-ca.crt"])
async def test_untrusted_upstream_certificate_is_refused(tmp_path: Path, certs: Path,
                                                         tls_upstream: FakeUpstream,
                                                         ca: str | None) -> None:
    """An upstream certificate that neither the system's CAs nor `ca_file` vouch for fails
    the request with 502 upstream_unavailable; nothing reaches the upstream."""
    upstream = {"ca_file": str(certs / ca)} if ca else {}
    async with running_gateway(tmp_path, tls_upstream.url, OPEN_POLICY,
                               upstream=upstream) as gw:
        _, key = await gw.issue_key("direct")
        status, body, _ = await send(gw.url, key)
        assert (status, code_of(body)) == (502, "upstream_unavailable"), body
        assert not tls_upstream.requests


async def test_trust_env_goes_through_https_proxy(tmp_path: Path, certs: Path,
                                                  tls_upstream: FakeUpstream,
                                                  no_proxy_env: pytest.MonkeyPatch) -> None:
    """With `upstream.trust_env: true` the upstream is reached through the CONNECT proxy that
    HTTPS_PROXY names (TLS verified end to end inside the tunnel), and directly once
    NO_PROXY names the upstream's host."""
    async with ConnectProxy() as proxy, running_gateway(
            tmp_path, tls_upstream.url, OPEN_POLICY,
            upstream={"ca_file": str(certs / "ca.crt"), "trust_env": True}) as gw:
        no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        _, key = await gw.issue_key("direct")
        status, body, _ = await send(gw.url, key)
        assert status == 200, body
        assert proxy.targets == [f"127.0.0.1:{tls_upstream.port}"]
        no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
        status, body, _ = await send(gw.url, key)
        assert status == 200, body
        assert len(proxy.targets) == 1 and len(tls_upstream.requests) == 2


async def test_environment_ignored_without_trust_env(tmp_path: Path, certs: Path,
                                                     tls_upstream: FakeUpstream,
                                                     no_proxy_env: pytest.MonkeyPatch) -> None:
    """By default (`trust_env: false`) HTTPS_PROXY is not used: the upstream is reached
    directly."""
    async with ConnectProxy() as proxy, running_gateway(
            tmp_path, tls_upstream.url, OPEN_POLICY,
            upstream={"ca_file": str(certs / "ca.crt")}) as gw:
        no_proxy_env.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        _, key = await gw.issue_key("direct")
        status, body, _ = await send(gw.url, key)
        assert status == 200, body
        assert not proxy.targets
