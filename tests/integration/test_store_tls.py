"""`rediss://` stores on a real redis-server speaking TLS (a throwaway CA made with the openssl
CLI): the URL's TLS options (ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs,
ssl_check_hostname) apply to the pipelined admission connection exactly as to the pooled
client."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from gateway.errors import StoreError
from gateway.store.base import AdmitRequest, KeyRecord, Subject
from gateway.store.redis import RedisStore
from gateway.store.redis.pipelined import PipelinedRunner
from tests.support.redis_server import RedisServer, free_port


def _openssl(*args: str, cwd: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl CLI is needed to make test certificates"
    subprocess.run([openssl, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}", cwd=d)


def _leaf(d: Path, name: str, ca: str, san: str | None) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", str(ext),
             cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed, and a
    second CA that signed nothing of these."""
    d = tmp_path_factory.mktemp("tls")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "IP:127.0.0.1")
    _leaf(d, "client", "ca", None)
    return d


class TLSRedis:
    def __init__(self, server: RedisServer, tls_port: int) -> None:
        self.server = server
        self.tls_port = tls_port

    def url(self, **params: str) -> str:
        query = f"?{urlencode(params)}" if params else ""
        return f"rediss://127.0.0.1:{self.tls_port}/0{query}"


@pytest.fixture
def tls_redis(certs: Path) -> Iterator[TLSRedis]:
    """A redis-server with a TLS port that requires a client certificate from `ca`."""
    tls_port = free_port()
    args = ["--tls-port", str(tls_port), "--tls-cert-file", str(certs / "server.crt"),
            "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "yes"]
    with RedisServer(args) as server:
        yield TLSRedis(server, tls_port)


def _subject() -> Subject:
    return Subject("key", "k1", "r" + uuid.uuid4().hex[:6], rpm=10)


async def _use(store: RedisStore) -> None:
    """One admission (the pipelined connection) and one key write and read (the pool)."""
    await store.start()
    try:
        assert (await store.admit(AdmitRequest((_subject(),), "l1", 60_000, 0, 0))).ok
        assert isinstance(store.scripts, PipelinedRunner) and store.scripts.connected
        await store.put_key(KeyRecord("k1", "r", "h" * 64))
        assert await store.get_key("k1") is not None
    finally:
        await store.close()


async def test_ca_and_client_certificate_from_the_url(tls_redis: TLSRedis, certs: Path) -> None:
    """With the URL's CA and client certificate, admission over the pipelined connection and
    key reads over the pool both work against a server that verifies clients."""
    url = tls_redis.url(ssl_ca_certs=str(certs / "ca.crt"),
                        ssl_certfile=str(certs / "client.crt"),
                        ssl_keyfile=str(certs / "client.key"))
    await _use(RedisStore(url, f"tls{uuid.uuid4().hex[:8]}:", timeout_s=2.0))


async def test_cert_reqs_none_turns_verification_off_on_both(
        tls_redis: TLSRedis, certs: Path) -> None:
    """ssl_cert_reqs=none (no CA given): the server certificate is not verified, on the
    pipelined connection as on the pool."""
    url = tls_redis.url(ssl_cert_reqs="none", ssl_certfile=str(certs / "client.crt"),
                        ssl_keyfile=str(certs / "client.key"))
    await _use(RedisStore(url, f"tls{uuid.uuid4().hex[:8]}:", timeout_s=2.0))


@pytest.mark.parametrize("case", ["wrong_ca", "no_client_cert"])
async def test_failed_verification_is_a_store_error_on_both(
        tls_redis: TLSRedis, certs: Path, case: str) -> None:
    """A server certificate from another CA, or no client certificate where the server wants
    one, fails both transports with StoreError."""
    if case == "wrong_ca":
        url = tls_redis.url(ssl_ca_certs=str(certs / "other-ca.crt"),
                            ssl_certfile=str(certs / "client.crt"),
                            ssl_keyfile=str(certs / "client.key"))
    else:
        url = tls_redis.url(ssl_ca_certs=str(certs / "ca.crt"))
    store = RedisStore(url, f"tls{uuid.uuid4().hex[:8]}:", timeout_s=1.0)
    try:
        with pytest.raises(StoreError):
            await store.admit(AdmitRequest((_subject(),), "l1", 60_000, 0, 0))
        with pytest.raises(StoreError):
            await store.versions()
    finally:
        await store.close()
