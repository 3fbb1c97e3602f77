"""TLS on the proxy listener, end to end: the official SDKs over TLS and mTLS, keys bound to
client certificates (the two 403s never reach the upstream), certificate reload on SIGHUP and
on a file change without a signal on a real `gateway run` process (files replaced by atomic
renames, key first) with a connection opened before the swap still served, and a bad
certificate refused while the good one stays. Certificates come from a CA made in the test."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from gateway.cli import main as cli_main
from tests.support.certs import (
    Issued,
    TestCA,
    install,
    live_certificate,
    served_certificate,
    served_now,
)
from tests.support.cli import US, cli_env, gateway_process, run_cli
from tests.support.gateway import DEFAULT_POLICY, poll, running_gateway, write_config
from tests.support.raw_http import raw_request, read_response
from tests.support.upstream import FakeUpstream

MESSAGE: dict[str, Any] = {"model": "claude-test-1", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


def _tls(server: Issued, ca: TestCA | None = None, **more: Any) -> dict[str, Any]:
    section: dict[str, Any] = {"cert_file": str(server.cert_file),
                               "key_file": str(server.key_file), **more}
    if ca is not None:
        section["client_ca_file"] = str(ca.cert_file)
    return section


def _bound_policy(*fingerprints: str) -> dict[str, Any]:
    """The shipped policy with `direct` bound to `fingerprints` and an unbound reseller
    `open`."""
    resellers = dict(DEFAULT_POLICY["resellers"])
    resellers["direct"] = {**resellers["direct"], "client_cert_sha256": list(fingerprints)}
    resellers["open"] = {"countries": ["US"]}
    return {**DEFAULT_POLICY, "resellers": resellers}


def _https(port: int) -> str:
    return f"https://127.0.0.1:{port}"


async def test_official_sdks_work_over_tls(tmp_path: Path, upstream: FakeUpstream,
                                           ca: TestCA) -> None:
    """The anthropic and openai SDKs, trusting the test CA, are served over TLS."""
    server = ca.issue("server")
    async with running_gateway(tmp_path, upstream.url, tls=_tls(server)) as gw:
        _, key = await gw.issue_key("direct")
        base = _https(gw.service.proxy_port)
        async with anthropic.AsyncAnthropic(
                base_url=base, api_key=key, max_retries=0, default_headers=US,
                http_client=anthropic.DefaultAsyncHttpxClient(verify=ca.client_context())
        ) as claude:
            msg = await claude.messages.create(**MESSAGE)
        assert msg.usage.output_tokens == upstream.output_tokens
        async with openai.AsyncOpenAI(
                base_url=base + "/v1", api_key=key, max_retries=0, default_headers=US,
                http_client=openai.DefaultAsyncHttpxClient(verify=ca.client_context())
        ) as gpt:
            chat = await gpt.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == upstream.reply_text
        assert [r["status"] for r in gw.logs.requests()] == [200, 200]
        served = await asyncio.to_thread(served_certificate, "127.0.0.1",
                                         gw.service.proxy_port, ca)
        assert served == server.sha256
        [loaded] = gw.logs.events("tls_certificate_loaded")
        assert loaded["sha256"] == server.sha256


async def test_official_sdks_work_over_mtls_and_a_client_without_a_certificate_is_refused(
        tmp_path: Path, upstream: FakeUpstream, ca: TestCA) -> None:
    """With require_client_cert, both SDKs presenting a certificate of the client CA are
    served; one presenting none fails its handshake and reaches nothing."""
    server, client = ca.issue("server"), ca.issue("client", server=False)
    async with running_gateway(tmp_path, upstream.url,
                               tls=_tls(server, ca, require_client_cert=True)) as gw:
        _, key = await gw.issue_key("direct")
        base = _https(gw.service.proxy_port)
        mtls = ca.client_context(client)
        async with anthropic.AsyncAnthropic(
                base_url=base, api_key=key, max_retries=0, default_headers=US,
                http_client=anthropic.DefaultAsyncHttpxClient(verify=mtls)) as claude:
            msg = await claude.messages.create(**MESSAGE)
        assert msg.usage.output_tokens == upstream.output_tokens
        async with openai.AsyncOpenAI(
                base_url=base + "/v1", api_key=key, max_retries=0, default_headers=US,
                http_client=openai.DefaultAsyncHttpxClient(verify=mtls)) as gpt:
            chat = await gpt.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content == upstream.reply_text
        before = len(upstream.requests)
        async with anthropic.AsyncAnthropic(
                base_url=base, api_key=key, max_retries=0, default_headers=US,
                http_client=anthropic.DefaultAsyncHttpxClient(verify=ca.client_context())
        ) as anonymous:
            with pytest.raises(anthropic.APIConnectionError):
                await anonymous.messages.create(**MESSAGE)
        assert len(upstream.requests) == before
        assert [r["status"] for r in gw.logs.requests()] == [200, 200]


async def test_a_bound_reseller_needs_its_client_certificate(
        tmp_path: Path, upstream: FakeUpstream, ca: TestCA) -> None:
    """A key of a reseller bound to a client certificate gets 403 client_certificate_required
    without one and client_certificate_mismatch with another (neither reaches the upstream),
    and is served with its own; an unbound reseller's key needs none (require_client_cert
    false). The admin and CLI explain agree on the same fingerprints."""
    server = ca.issue("server")
    mine, other = ca.issue("mine", server=False), ca.issue("other", server=False)
    async with running_gateway(tmp_path, upstream.url, _bound_policy(mine.sha256),
                               tls=_tls(server, ca)) as gw:
        key_id, key = await gw.issue_key("direct")
        _, open_key = await gw.issue_key("open")
        base = _https(gw.service.proxy_port)

        async def call(ctx: ssl.SSLContext, api_key: str) -> tuple[int, dict[str, Any]]:
            async with aiohttp.ClientSession() as http, http.post(
                    base + "/v1/messages", json=MESSAGE, ssl=ctx,
                    headers={"x-api-key": api_key, **US}) as r:
                return r.status, await r.json()

        for ctx, code in ((ca.client_context(), "client_certificate_required"),
                          (ca.client_context(other), "client_certificate_mismatch")):
            status, body = await call(ctx, key)
            assert (status, body["error"]["type"], body["error"]["code"]) == (
                403, "permission_error", code)
        assert upstream.requests == []
        assert (await call(ca.client_context(mine), key))[0] == 200
        assert (await call(ca.client_context(), open_key))[0] == 200
        assert len(upstream.requests) == 2
        lines = gw.logs.requests()
        assert [(x["reason"], x["key_id"], x["decision"]) for x in lines[:2]] == [
            ("client_certificate_required", key_id, "deny"),
            ("client_certificate_mismatch", key_id, "deny")]
        for fingerprint, code in ((None, "client_certificate_required"),
                                  (other.sha256, "client_certificate_mismatch"),
                                  (mine.sha256, None)):
            query = {"ip": "192.0.2.1", "key_id": key_id, "model": "claude-test-1",
                     **({"client_cert_sha256": fingerprint} if fingerprint else {})}
            status, out = await gw.admin("GET", "/admin/explain", params=query)
            assert status == 200 and out["decision"]["code"] == code
        status, out = await gw.admin("GET", "/admin/explain", params={
            "ip": "192.0.2.1", "key_id": key_id, "client_cert_sha256": "xyz"})
        assert status == 400 and "client_cert_sha256" in out["error"]["message"]
        admin = f"admin_listen=127.0.0.1:{gw.service.admin_port}"  # the CLI calls it
        done = await asyncio.to_thread(
            run_cli, "explain", "--ip", "192.0.2.1", "--key-id", key_id, "--json",
            "--client-cert-sha256", mine.sha256_colons, "--set", admin,
            config=gw.tmp / "gateway.yaml")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["request"]["client_cert_sha256"] == mine.sha256
        bad = await asyncio.to_thread(
            run_cli, "explain", "--ip", "192.0.2.1", "--key-id", key_id,
            "--client-cert-sha256", "xyz", "--set", admin, config=gw.tmp / "gateway.yaml")
        assert bad.returncode == 2 and "SHA-256" in bad.stderr


class KeptConnection:
    """One HTTP/1.1 keep-alive connection over TLS, for requests before and after a swap."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ca: TestCA) -> KeptConnection:
        return cls(*await asyncio.open_connection("127.0.0.1", port, ssl=ca.client_context(),
                                                  server_hostname="127.0.0.1"))

    @property
    def served(self) -> str:
        """SHA-256 of the certificate this connection shook hands with."""
        import hashlib

        der = self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return hashlib.sha256(der).hexdigest()

    async def get(self, path: str, key: str) -> tuple[int, bytes]:
        self.writer.write(raw_request("GET", path, {"x-api-key": key, **US}))
        async with asyncio.timeout(30):
            resp = await read_response(self.reader)
        return resp.status, resp.body

    def close(self) -> None:
        self.writer.close()


async def _serves(port: int, ca: TestCA, sha256: str) -> bool:
    return await served_now(port, ca) == sha256


async def test_sighup_swaps_the_certificate_and_an_open_connection_keeps_working(
        tmp_path: Path, upstream: FakeUpstream, ca: TestCA) -> None:
    """On a real process, a certificate renamed into place (key first) and SIGHUP: new
    connections get it, a connection opened before keeps being served with its own; a key
    that does not match refuses the reload (config_reload_failed naming tls.key_file) and
    the certificate in service stays."""
    first, cert, key_file = live_certificate(ca, tmp_path)
    tls = {"cert_file": str(cert), "key_file": str(key_file), "reload_interval_s": 3600}
    async with gateway_process(tmp_path, upstream.url, tls=tls) as gw:
        assert gw.port is not None
        _, key = await gw.issue_key()
        old = await KeptConnection.open(gw.port, ca)
        assert (await old.get("/v1/models", key))[0] == 200
        assert await _serves(gw.port, ca, first.sha256)
        second = ca.issue("second", folder=tmp_path / "made")
        install(second, cert, key_file)
        gw.signal(signal.SIGHUP)
        await poll(lambda: _serves(gw.port or 0, ca, second.sha256), timeout=30, interval=0.1)
        status, body = await old.get("/v1/models", key)  # opened before the swap
        assert status == 200 and b"claude-test-1" in body
        assert old.served == first.sha256
        old.close()
        assert [e["sha256"] for e in gw.events("tls_certificate_loaded")] == [
            first.sha256, second.sha256]

        third = ca.issue("third", folder=tmp_path / "made")
        key_file.write_bytes(third.key_file.read_bytes())  # a key without its certificate
        gw.signal(signal.SIGHUP)
        [failed] = await poll(lambda: gw.events("config_reload_failed"), timeout=30)
        assert "tls.key_file" in failed["reason"] and "does not match" in failed["reason"]
        assert await _serves(gw.port, ca, second.sha256)
        fresh = await KeptConnection.open(gw.port, ca)
        assert (await fresh.get("/v1/models", key))[0] == 200
        fresh.close()


async def test_a_file_change_without_a_signal_is_served_and_a_bad_one_refused(
        tmp_path: Path, upstream: FakeUpstream, ca: TestCA) -> None:
    """With no signal, files renamed into place are noticed within the watch interval
    (`tls.reload_interval_s`); a certificate file that is no certificate is refused
    (tls_certificate_rejected) and the good one keeps being served."""
    first, cert, key_file = live_certificate(ca, tmp_path)
    tls = {"cert_file": str(cert), "key_file": str(key_file), "reload_interval_s": 0.2}
    async with gateway_process(tmp_path, upstream.url, tls=tls) as gw:
        assert gw.port is not None
        _, key = await gw.issue_key()
        old = await KeptConnection.open(gw.port, ca)
        assert await _serves(gw.port, ca, first.sha256)
        second = ca.issue("second", folder=tmp_path / "made")
        install(second, cert, key_file)
        await poll(lambda: _serves(gw.port or 0, ca, second.sha256), timeout=60, interval=0.2)
        assert (await old.get("/v1/models", key))[0] == 200
        old.close()
        broken = tmp_path / "made" / "broken.crt"
        broken.write_text("this is no certificate\n")
        tmp = cert.with_name(".tls.crt.tmp")
        tmp.write_bytes(broken.read_bytes())
        tmp.replace(cert)
        [rejected] = await poll(lambda: gw.events("tls_certificate_rejected"), timeout=60)
        assert "tls.cert_file" in rejected["reason"]
        assert rejected["sha256"] == second.sha256
        assert await _serves(gw.port, ca, second.sha256)


def test_check_config_names_a_key_that_does_not_match(
        tmp_path: Path, ca: TestCA, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway check-config` (the checks `run` makes before it listens) refuses a key of
    another certificate and a missing client CA, one line each naming the field."""
    server, other = ca.issue("server"), ca.issue("other")
    config = write_config(tmp_path, "http://127.0.0.1:9", tls={
        "cert_file": str(server.cert_file), "key_file": str(other.key_file),
        "client_ca_file": str(tmp_path / "missing-ca.crt")})
    for name, value in cli_env().items():
        monkeypatch.setenv(name, value)
    assert cli_main(["check-config", "--config", str(config)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"error: {config}: tls.key_file: ")
    assert "does not match" in lines[0]
    assert lines[1].startswith(f"error: {config}: tls.client_ca_file: cannot read")
