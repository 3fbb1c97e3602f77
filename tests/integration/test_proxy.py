"""The proxy stage end to end: official SDKs as clients, streaming, header hygiene both ways,
upstream failures, body limits, disconnects, raw sockets and the request log line."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from tests.support.gateway import ADMIN_TOKEN, UPSTREAM_KEY, RunningGateway, poll, running_gateway
from tests.support.raw_http import exchange, raw_request
from tests.support.redis_server import free_port
from tests.support.upstream import MARKER_HEADER, FakeUpstream, anthropic_error_body

US = "192.0.2.1"
GB = "192.0.2.20"
MESSAGE = {"model": "claude-test-1", "max_tokens": 64,
           "messages": [{"role": "user", "content": "hi"}]}
LOG_FIELDS = {
    "request_id", "client_ip", "peer_ip", "country", "asn", "anonymizer", "reseller", "key_id",
    "customer_id", "customer_ip", "customer_country", "attestation_sig", "model", "method",
    "path", "decision",
    "rule", "reason", "shadow", "status", "upstream_status", "duration_ms", "upstream_ms",
    "input_tokens", "output_tokens",
}
# What structlog adds to every event.
LOG_ENVELOPE = {"event", "level", "timestamp", "worker"}  # on every line, not only requests


# --- helpers ------------------------------------------------------------------------------------

async def request_lines(gw: RunningGateway, count: int) -> list[dict[str, Any]]:
    """The request log lines once at least `count` were written (the line follows the answer)."""
    await poll(lambda: len(gw.logs.requests()) >= count)
    return gw.logs.requests()


def assert_error_shape(body: Any, status_type: str, code: str | None, request_id: str) -> None:
    assert body["type"] == "error"
    assert body["error"]["type"] == status_type
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["request_id"] == request_id


def message_body(**extra: Any) -> bytes:
    return json.dumps({**MESSAGE, **extra}).encode()


# --- official SDKs ------------------------------------------------------------------------------

async def test_anthropic_sdk_non_streaming(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An Anthropic SDK message comes back with its content and usage, and the line logs it."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        key_id, key = await gw.issue_key()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as client:
            raw = await client.messages.with_raw_response.create(**MESSAGE)  # type: ignore[call-overload]
            msg = await raw.parse()
        assert msg.content[0].text == upstream.reply_text
        assert msg.usage.input_tokens == upstream.input_tokens
        assert msg.usage.output_tokens == upstream.output_tokens
        assert raw.headers["x-request-id"]
        assert raw.headers[MARKER_HEADER] == "yes"
        assert upstream.last_request.json() == MESSAGE
        [line] = await request_lines(gw, 1)
        assert line["request_id"] == raw.headers["x-request-id"]
        assert line["key_id"] == key_id and line["reseller"] == "direct"
        assert line["decision"] == "allow" and line["status"] == 200
        assert line["upstream_status"] == 200
        assert line["model"] == "claude-test-1"
        assert line["input_tokens"] == upstream.input_tokens
        assert line["output_tokens"] == upstream.output_tokens


async def test_anthropic_sdk_streaming(tmp_path: Path, upstream: FakeUpstream) -> None:
    """messages.stream through the gateway yields the upstream's text and final usage."""
    upstream.chunks = 6
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as client:
            texts: list[str] = []
            async with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
                async for text in stream.text_stream:
                    texts.append(text)
                final = await stream.get_final_message()
        assert texts == upstream.reply_deltas()
        assert final.content[0].text == upstream.reply_text  # type: ignore[union-attr]
        assert final.usage.input_tokens == upstream.input_tokens
        assert final.usage.output_tokens == upstream.output_tokens
        [line] = await request_lines(gw, 1)
        assert line["status"] == 200 and line["decision"] == "allow"
        assert line["input_tokens"] == upstream.input_tokens
        assert line["output_tokens"] == upstream.output_tokens


async def test_openai_sdk_non_streaming(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An OpenAI SDK chat completion (key as Authorization: Bearer) arrives intact."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        key_id, key = await gw.issue_key()
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                                      default_headers={"X-Forwarded-For": GB}) as client:
            done = await client.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}], max_tokens=50)
        assert done.choices[0].message.content == upstream.reply_text
        assert done.usage is not None
        assert done.usage.prompt_tokens == upstream.input_tokens
        assert done.usage.completion_tokens == upstream.output_tokens
        seen = upstream.last_request
        assert seen.path == "/v1/chat/completions"
        assert key not in json.dumps(list(seen.headers.items()))
        [line] = await request_lines(gw, 1)
        assert line["key_id"] == key_id and line["country"] == "GB"
        assert line["model"] == "gpt-test-1" and line["status"] == 200
        assert line["input_tokens"] == upstream.input_tokens
        assert line["output_tokens"] == upstream.output_tokens


async def test_openai_sdk_streaming_with_usage(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A streamed OpenAI chat completion with include_usage delivers every delta and the usage."""
    upstream.chunks = 5
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                                      default_headers={"X-Forwarded-For": US}) as client:
            stream = await client.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}],
                max_tokens=50, stream=True, stream_options={"include_usage": True})
            deltas: list[str] = []
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    deltas.append(chunk.choices[0].delta.content)
                if chunk.usage is not None:
                    usage = chunk.usage
        assert deltas == upstream.reply_deltas()
        assert usage is not None
        assert usage.prompt_tokens == upstream.input_tokens
        assert usage.completion_tokens == upstream.output_tokens
        [line] = await request_lines(gw, 1)
        assert line["status"] == 200
        assert line["input_tokens"] == upstream.input_tokens
        assert line["output_tokens"] == upstream.output_tokens


async def test_stream_first_event_reaches_client_while_upstream_streams(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The SDK sees the stream's first event while the upstream is still holding the rest."""
    hold = asyncio.Event()
    upstream.hold_stream = hold
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as client:
            async with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
                events = aiter(stream)
                async with asyncio.timeout(15):
                    first = await anext(events)
                assert first.type == "message_start"
                # The upstream is still holding its answer open at this point.
                assert upstream.first_event_sent.is_set()
                assert not upstream.last_request.finished.is_set()
                hold.set()
                rest = [event async for event in events]
                final = await stream.get_final_message()
        assert rest[-1].type == "message_stop"
        assert final.content[0].text == upstream.reply_text  # type: ignore[union-attr]
        [line] = await request_lines(gw, 1)
        assert line["status"] == 200
        assert line["output_tokens"] == upstream.output_tokens


# --- credentials and forwarded headers ----------------------------------------------------------

async def test_upstream_sees_its_credential_never_the_clients_key(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """The client's key is removed (x-api-key or Bearer) and the upstream key sent as x-api-key."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http:
            for auth in ({"x-api-key": key}, {"Authorization": f"Bearer {key}"}):
                async with http.post(gw.url + "/v1/messages", data=message_body(),
                                     headers={**auth, "Content-Type": "application/json",
                                              "X-Forwarded-For": US}) as r:
                    assert r.status == 200, await r.text()
                seen = upstream.last_request.headers
                assert seen.getall("x-api-key") == [UPSTREAM_KEY]
                assert "authorization" not in seen
                assert key not in json.dumps(list(seen.items()))


async def test_upstream_credential_as_bearer(tmp_path: Path, upstream: FakeUpstream) -> None:
    """With auth_header: authorization the upstream gets `Authorization: Bearer <key>` only."""
    async with running_gateway(tmp_path, upstream.url,
                               upstream={"auth_header": "authorization"}) as gw:
        _, key = await gw.issue_key()
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                                      default_headers={"X-Forwarded-For": US}) as client:
            await client.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}])
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as aclient:
            await aclient.messages.create(**MESSAGE)  # type: ignore[call-overload]
        assert len(upstream.requests) == 2
        for seen in upstream.requests:
            assert seen.headers.getall("authorization") == [f"Bearer {UPSTREAM_KEY}"]
            assert "x-api-key" not in seen.headers
            assert key not in json.dumps(list(seen.headers.items()))


async def test_customer_attestation_headers_are_stripped(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """X-Customer-Id / X-Customer-IP are judged and logged, never forwarded upstream."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key("acme")
        headers = {"X-Forwarded-For": US, "X-Customer-Id": "cust-42", "X-Customer-IP": GB}
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers=headers) as client:
            await client.messages.create(**MESSAGE)  # type: ignore[call-overload]
        seen = upstream.last_request.headers
        assert "x-customer-id" not in seen and "x-customer-ip" not in seen
        [line] = await request_lines(gw, 1)
        assert line["reseller"] == "acme"
        assert line["customer_id"] == "cust-42" and line["customer_ip"] == GB
        assert line["customer_country"] == "GB"


async def test_forwarded_for_appends_trusted_peer(tmp_path: Path, upstream: FakeUpstream) -> None:
    """From a trusted peer the upstream gets the client's chain with the peer appended."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.url + "/v1/messages", data=message_body(),
                                 headers={"x-api-key": key, "X-Forwarded-For": f"10.1.2.3, {US}",
                                          "Content-Type": "application/json"}) as r:
                assert r.status == 200
        assert upstream.last_request.headers.getall("x-forwarded-for") == [
            f"10.1.2.3, {US}, 127.0.0.1"]
        [line] = await request_lines(gw, 1)
        assert line["client_ip"] == US and line["peer_ip"] == "127.0.0.1"
        assert line["country"] == "US"


# --- header hygiene -----------------------------------------------------------------------------

async def test_hop_by_hop_request_headers_are_not_forwarded(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Hop-by-hop and Connection-listed request headers stop at the gateway; others pass."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        data = raw_request("POST", "/v1/messages", [
            ("Content-Type", "application/json"),
            ("x-api-key", key),
            ("X-Forwarded-For", US),
            ("Connection", "keep-alive, X-Hop-Secret"),
            ("X-Hop-Secret", "do-not-forward"),
            ("Keep-Alive", "timeout=30"),
            ("TE", "trailers"),
            ("Upgrade", "h2c"),
            ("Proxy-Authorization", "Basic cHJveHk6c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
            ("X-End-To-End", "kept"),
            ("anthropic-version", "2023-06-01"),
        ], message_body())
        [resp] = await exchange(gw.url, data)
        assert resp.status == 200, resp.body
        seen = upstream.last_request.headers
        for name in ("keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection",
                     "x-hop-secret"):
            assert name not in seen, name
        assert "x-hop-secret" not in ",".join(seen.getall("connection", [])).lower()
        assert "do-not-forward" not in json.dumps(list(seen.items()))
        assert seen["x-end-to-end"] == "kept"
        assert seen["anthropic-version"] == "2023-06-01"


async def test_hop_by_hop_response_headers_are_not_passed_back(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Upstream hop-by-hop headers stay behind; end-to-end ones and one x-request-id come back."""
    chat = json.dumps({"model": "gpt-test-1", "messages": [{"role": "user", "content": "hi"}],
                       "stream": True}).encode()
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        headers = {"Content-Type": "application/json", "x-api-key": key, "X-Forwarded-For": US}
        cases = [("/v1/messages", message_body(), b'"type":"message"'),
                 ("/v1/messages", message_body(stream=True), b"message_stop"),
                 ("/v1/chat/completions", chat, b"data: [DONE]")]
        for path, body, expected in cases:
            [resp] = await exchange(gw.url, raw_request("POST", path, headers, body))
            assert resp.status == 200
            assert expected in resp.body
            assert resp.all(MARKER_HEADER) == ["yes"]
            assert resp.all("keep-alive") == []
            # Connection is the gateway's own business: never the upstream's "keep-alive" value.
            assert all(v.lower() != "keep-alive" for v in resp.all("connection"))
            [rid] = resp.all("x-request-id")
            lines = await request_lines(gw, len(upstream.requests))
            assert lines[-1]["request_id"] == rid


async def test_request_id_on_every_response_matches_log(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Success, a gateway 4xx and an upstream 500 all carry the logged x-request-id."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        ids: list[str] = []
        async with aiohttp.ClientSession() as http:
            good = {"x-api-key": key, "X-Forwarded-For": US, "Content-Type": "application/json"}
            async with http.post(gw.url + "/v1/messages", data=message_body(),
                                 headers=good) as r:
                assert r.status == 200
                ids.append(r.headers["x-request-id"])
            async with http.post(gw.url + "/v1/messages", data=message_body(),
                                 headers={"X-Forwarded-For": US}) as r:
                assert r.status == 401
                ids.append(r.headers["x-request-id"])
                assert (await r.json())["request_id"] == ids[-1]
            upstream.fail_status = 500
            async with http.post(gw.url + "/v1/messages", data=message_body(),
                                 headers=good) as r:
                assert r.status == 500
                ids.append(r.headers["x-request-id"])
        assert len(set(ids)) == 3 and all(ids)
        lines = await request_lines(gw, 3)
        assert [x["request_id"] for x in lines] == ids
        assert [x["status"] for x in lines] == [200, 401, 500]
        # The upstream is told the same id, so its logs join ours.
        assert [r.headers["x-request-id"] for r in upstream.requests] == [ids[0], ids[2]]


async def test_client_request_id_trusted_only_from_trusted_peer(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A trusted peer's x-request-id is kept end to end; an untrusted peer's is replaced."""
    supplied = "trace-abc.123"
    headers = {"X-Forwarded-For": US, "x-request-id": supplied,
               "Content-Type": "application/json"}
    async with running_gateway(tmp_path / "trusted", upstream.url) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=message_body(), headers={**headers, "x-api-key": key}
        ) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == supplied
        assert upstream.last_request.headers["x-request-id"] == supplied
        [line] = await request_lines(gw, 1)
        assert line["request_id"] == supplied
    async with running_gateway(tmp_path / "untrusted", upstream.url,
                               client_ip={"trusted_proxies": ["10.0.0.0/8"]}) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=message_body(), headers={**headers, "x-api-key": key}
        ) as r:
            assert r.status == 200
            rid = r.headers["x-request-id"]
        assert rid != supplied and rid
        seen = upstream.last_request.headers
        assert seen["x-request-id"] == rid
        # An untrusted peer's forwarding chain is not believed, nor passed on.
        assert seen.getall("x-forwarded-for") == ["127.0.0.1"]
        [line] = await request_lines(gw, 1)
        assert line["request_id"] == rid
        assert line["client_ip"] == "127.0.0.1" and line["country"] is None


# --- upstream failures --------------------------------------------------------------------------

async def test_upstream_connection_refused_is_502(tmp_path: Path) -> None:
    """An unreachable upstream answers 502 api_error/upstream_unavailable that the SDK parses."""
    dead = f"http://127.0.0.1:{free_port()}"
    async with running_gateway(tmp_path, dead) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=message_body(),
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 502
            assert r.content_type == "application/json"
            assert_error_shape(await r.json(), "api_error", "upstream_unavailable",
                               r.headers["x-request-id"])
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as client:
            with pytest.raises(anthropic.APIStatusError) as info:
                await client.messages.create(**MESSAGE)  # type: ignore[call-overload]
        err = info.value
        assert err.status_code == 502
        assert isinstance(err.body, dict)
        assert err.body["error"]["type"] == "api_error"
        assert err.body["error"]["code"] == "upstream_unavailable"
        lines = await request_lines(gw, 2)
        for line in lines:
            assert line["status"] == 502 and line["decision"] == "error"
            assert line["reason"] == "upstream_unavailable"
            assert line["upstream_status"] is None


async def test_upstream_timeout_is_504(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An upstream that does not answer within read_timeout_s gets 504 upstream_timeout."""
    upstream.response_delay_s = 30
    async with running_gateway(tmp_path, upstream.url, upstream={"read_timeout_s": 0.5}) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=message_body(),
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 504
            assert_error_shape(await r.json(), "api_error", "upstream_timeout",
                               r.headers["x-request-id"])
        # Giving up closes the upstream request.
        await poll(lambda: upstream.last_request.disconnected)
        [line] = await request_lines(gw, 1)
        assert line["status"] == 504 and line["reason"] == "upstream_timeout"


async def test_upstream_error_passes_through_verbatim(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """An upstream 500 reaches the client unchanged: status, body and end-to-end headers."""
    upstream.fail_status = 500
    upstream.fail_headers = {"x-upstream-detail": "shard-7"}
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=message_body(),
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 500
            assert await r.json() == anthropic_error_body(500, "boom")
            assert r.headers[MARKER_HEADER] == "yes"
            assert r.headers["x-upstream-detail"] == "shard-7"
            assert r.headers["x-request-id"]
        [line] = await request_lines(gw, 1)
        assert line["status"] == 500 and line["upstream_status"] == 500


# --- request bodies -----------------------------------------------------------------------------

async def test_oversized_body_with_content_length_is_413(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A declared body over max_body_bytes gets 413 request_too_large; nothing is forwarded."""
    async with running_gateway(tmp_path, upstream.url, upstream={"max_body_bytes": 1000}) as gw:
        _, key = await gw.issue_key()
        big = message_body(padding="x" * 2000)
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=big,
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
            assert_error_shape(await r.json(), "request_too_large", "request_too_large",
                               r.headers["x-request-id"])
        # A body within the limit still goes through.
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=message_body(),
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 200
        assert len(upstream.requests) == 1
        lines = await request_lines(gw, 2)
        assert lines[0]["status"] == 413


async def test_oversized_chunked_body_is_413(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A chunked body that grows past max_body_bytes gets 413 too; the upstream is not called."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model": "claude-test-1", "padding": "'
        for _ in range(10):
            yield b"x" * 300
        yield b'"}'

    async with running_gateway(tmp_path, upstream.url, upstream={"max_body_bytes": 1000}) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=chunks(),
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 413
            assert r.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert_error_shape(await r.json(), "request_too_large", "request_too_large",
                               r.headers["x-request-id"])
        [line] = await request_lines(gw, 1)
        assert line["status"] == 413
        assert upstream.requests == []


async def test_bad_json_is_400(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A body that is not JSON gets 400 invalid_request_error; the upstream is not called."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with aiohttp.ClientSession() as http, http.post(
            gw.url + "/v1/messages", data=b'{"model": "claude-test-1", ',
            headers={"x-api-key": key, "X-Forwarded-For": US,
                     "Content-Type": "application/json"},
        ) as r:
            assert r.status == 400
            assert_error_shape(await r.json(), "invalid_request_error", "invalid_json",
                               r.headers["x-request-id"])
        assert upstream.requests == []
        [line] = await request_lines(gw, 1)
        assert line["status"] == 400


# --- client disconnects -------------------------------------------------------------------------

async def test_client_disconnect_mid_stream_closes_upstream(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A client that hangs up mid-stream cancels the upstream request; the line is still logged."""
    hold = asyncio.Event()
    upstream.hold_stream = hold
    try:
        async with running_gateway(tmp_path, upstream.url) as gw:
            key_id, key = await gw.issue_key()
            async with aiohttp.ClientSession() as http:
                resp = await http.post(gw.url + "/v1/messages", data=message_body(stream=True),
                                       headers={"x-api-key": key, "X-Forwarded-For": US,
                                                "Content-Type": "application/json"})
                assert resp.status == 200
                async with asyncio.timeout(15):
                    first = await resp.content.readuntil(b"\n\n")
                assert first.startswith(b"event: message_start")
                resp.close()  # drops the connection
            await poll(lambda: upstream.last_request.disconnected)
            assert not upstream.last_request.completed
            [line] = await request_lines(gw, 1)
            assert line["key_id"] == key_id
            assert line["status"] == 499 and line["decision"] == "error"
            assert line["reason"] == "client_disconnected"
            assert line["upstream_status"] == 200
            assert line["upstream_ms"] is not None
            # Logged (and settled) on what the upstream reported before the cut.
            assert line["input_tokens"] == upstream.input_tokens
            assert line["output_tokens"] == 1  # message_start's count; the rest never came
    finally:
        hold.set()


# --- raw sockets --------------------------------------------------------------------------------

async def test_pipelined_keep_alive_requests(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Three pipelined requests on one connection get three answers, in order."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        headers = {"Content-Type": "application/json", "x-api-key": key, "X-Forwarded-For": US}
        data = (raw_request("POST", "/v1/messages?beta=true", headers, message_body())
                + raw_request("POST", "/v1/messages", {"X-Forwarded-For": US}, message_body())
                + raw_request("POST", "/v1/messages", headers, message_body(stream=True)))
        responses = await exchange(gw.url, data, responses=3)
        assert [r.status for r in responses] == [200, 401, 200]
        assert json.loads(responses[0].body)["content"][0]["text"] == upstream.reply_text
        assert json.loads(responses[1].body)["error"]["code"] == "invalid_api_key"
        assert responses[2].body.rstrip().endswith(b'data: {"type":"message_stop"}')
        ids = [r.header("x-request-id") for r in responses]
        assert len(set(ids)) == 3 and all(ids)
        lines = await request_lines(gw, 3)
        assert [x["request_id"] for x in lines] == ids
        assert [(r.path, r.query_string) for r in upstream.requests] == [
            ("/v1/messages", "beta=true"), ("/v1/messages", "")]


async def test_garbage_forwarded_for_falls_back_to_peer(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """A malformed X-Forwarded-For never yields an address: the trusted peer is the client."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        garbage = "203.0.113.5, ;;[zz]:x, 999.1.1.1, unknown"
        data = raw_request("POST", "/v1/messages",
                           {"Content-Type": "application/json", "x-api-key": key,
                            "X-Forwarded-For": garbage}, message_body())
        [resp] = await exchange(gw.url, data)
        assert resp.status == 200, resp.body
        [line] = await request_lines(gw, 1)
        assert line["client_ip"] == "127.0.0.1" and line["peer_ip"] == "127.0.0.1"
        assert line["country"] is None and line["anonymizer"] == []
        assert line["request_id"] == resp.header("x-request-id")


# --- listeners ----------------------------------------------------------------------------------

async def test_proxy_port_does_not_serve_admin_paths(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Health, metrics and admin paths are 404 on the proxy port and served on the admin port."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with aiohttp.ClientSession() as http:
            for path in ("/healthz", "/readyz", "/metrics", "/admin/keys", "/admin/policy"):
                async with http.get(gw.url + path, headers=auth) as r:
                    assert r.status == 404, path
                    assert_error_shape(await r.json(), "not_found_error", "not_found",
                                       r.headers["x-request-id"])
            async with http.get(gw.admin_url + "/healthz") as r:
                assert r.status == 200
            async with http.get(gw.admin_url + "/readyz") as r:
                assert r.status == 200
            async with http.get(gw.admin_url + "/metrics") as r:
                assert r.status == 200
                assert "gateway_requests_total" in await r.text()
            async with http.get(gw.admin_url + "/admin/keys") as r:
                assert r.status == 401
            async with http.get(gw.admin_url + "/admin/keys", headers=auth) as r:
                assert r.status == 200
        assert upstream.requests == []
        lines = await request_lines(gw, 5)
        assert {x["status"] for x in lines} == {404}


# --- the request log line -----------------------------------------------------------------------

async def test_log_line_has_every_field_and_no_secret(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    """Each request writes one line with exactly the request-line fields; no secret is logged."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        _, acme_key = await gw.issue_key("acme")
        async with aiohttp.ClientSession() as http:
            for headers, body in [
                ({"x-api-key": key, "X-Forwarded-For": US}, message_body()),
                ({"Authorization": f"Bearer {key}", "X-Forwarded-For": US},
                 message_body(stream=True)),
                ({"x-api-key": key, "X-Forwarded-For": "198.51.100.5"}, message_body()),
                ({"x-api-key": acme_key, "X-Forwarded-For": US, "X-Customer-Id": "c1",
                  "X-Customer-IP": "203.0.113.5"}, message_body()),
                ({"x-api-key": key + "x", "X-Forwarded-For": US}, message_body()),
                ({"Authorization": f"Bearer {ADMIN_TOKEN}"}, b""),
            ]:
                async with http.post(gw.url + "/v1/messages", data=body,
                                     headers={**headers, "Content-Type": "application/json"}
                                     ) as r:
                    await r.read()
        lines = await request_lines(gw, 6)
        assert len(lines) == 6
        for line in lines:
            assert set(line) - LOG_ENVELOPE == LOG_FIELDS
            assert line["event"] == "request"
            assert isinstance(line["anonymizer"], list) and isinstance(line["shadow"], list)
            assert line["decision"] in ("allow", "deny", "rate_limited", "error")
        assert [x["status"] for x in lines] == [200, 200, 403, 403, 401, 401]
        assert lines[0]["asn"] is None or isinstance(lines[0]["asn"], int)
        assert lines[2]["decision"] == "deny" and lines[2]["rule"] == "restricted-regions"
        assert lines[3]["rule"] == "anonymizers" and lines[3]["reason"] == "anonymizer_not_allowed"
        assert lines[3]["customer_id"] == "c1" and lines[3]["customer_ip"] == "203.0.113.5"
        assert lines[4]["key_id"] is None and lines[4]["reason"] == "invalid_api_key"
        raw = "\n".join(gw.logs.raw)
        for secret in (key, acme_key, key.split("_", 2)[2], UPSTREAM_KEY, ADMIN_TOKEN):
            assert secret not in raw


async def test_internal_error_answers_in_the_error_shape(tmp_path: Path,
                                                         upstream: FakeUpstream) -> None:
    """A fault inside the gateway (here: a geo resolver gone missing) answers 500 api_error /
    internal_error in the documented body, logs `internal_error` and the request line, and
    forwards nothing."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key("direct")
        snap = gw.service.pipeline.snapshot
        gw.service.pipeline.snapshot = replace(snap, geo=None)  # type: ignore[arg-type]
        async with aiohttp.ClientSession() as s, s.post(
                gw.url + "/v1/messages", json={"model": "m", "max_tokens": 5, "messages": []},
                headers={"x-api-key": key, "X-Forwarded-For": "192.0.2.1"}) as r:
            body = await r.json()
            gw.service.pipeline.snapshot = snap  # the resolver back, for the stop
            assert r.status == 500
            assert body["type"] == "error"
            assert (body["error"]["type"], body["error"]["code"]) == ("api_error",
                                                                      "internal_error")
            assert body["request_id"] == r.headers["x-request-id"]
        assert not upstream.requests
        assert gw.logs.events("internal_error")
        line = gw.logs.requests()[-1]
        assert (line["status"], line["decision"], line["reason"]) == (500, "error",
                                                                     "internal_error")
