"""Issue 10's walk-arounds, each reproduced on a real gateway in front of the stand-in upstream:
paths, metering, bodies before authentication, parser faults, log amplification and model
scopes that failed open. Raw sockets where a client library would tidy the request."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai

from tests.integration.test_proxy import request_lines
from tests.support.gateway import RunningGateway, poll, running_gateway
from tests.support.raw_http import exchange, port_of, raw_request
from tests.support.upstream import FakeUpstream

US = "192.0.2.1"
MESSAGE: dict[str, Any] = {"model": "claude-test-1", "max_tokens": 64,
                           "messages": [{"role": "user", "content": "hi"}]}


def hdrs(key: str, **extra: str) -> dict[str, str]:
    return {"x-api-key": key, "X-Forwarded-For": US, "content-type": "application/json",
            **extra}


async def post(gw: RunningGateway, key: str, body: bytes, path: str = "/v1/messages",
               **extra: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(gw.url + path, data=body,
                                                    headers=hdrs(key, **extra)) as r:
        return r.status, await r.json(content_type=None)


async def open_stream(gw: RunningGateway, key: str, body: bytes, until: bytes,
                      path: str = "/v1/messages") -> tuple[bytes, asyncio.StreamWriter]:
    """Send a request on a raw connection and read its answer up to `until`; the caller hangs
    up (or keeps the connection) with the writer it gets back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
    writer.write(raw_request("POST", path, hdrs(key), body))
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(until), 20)
    return head, writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


# --- paths ----------------------------------------------------------------------------------------

async def test_dot_segments_cannot_leave_a_path_scope(tmp_path: Path,
                                                      upstream: FakeUpstream) -> None:
    """`/v1/messages/../models` is judged as the `/v1/models` it names; encoded dot segments,
    encoded slashes and backslashes are refused as ambiguous, and nothing reaches the upstream."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(paths=["/v1/messages", "/v1/messages/**"])
        h = {"x-api-key": key, "X-Forwarded-For": US}
        [r] = await exchange(gw.url, raw_request("GET", "/v1/messages/../models", h))
        assert r.status == 403 and json.loads(r.body)["error"]["code"] == "path_not_allowed"
        for target in ("/v1/messages/%2e%2e/models", "/v1/messages/%2E%2E/models",
                       "/v1/messages/..%2fmodels", "/v1/messages%2f..%2fmodels",
                       "/v1/messages/..\\models"):
            [r] = await exchange(gw.url, raw_request("GET", target, h))
            assert r.status == 400, target
            assert json.loads(r.body)["error"]["code"] == "invalid_path", target
        assert upstream.requests == []


async def test_the_normalised_path_is_what_is_forwarded(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    """Merged slashes and resolved dot segments: the upstream sees the path the scope judged."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(paths=["/v1/messages"])
        [r] = await exchange(gw.url, raw_request("POST", "//v1/./x/..//messages?beta=true",
                                                 hdrs(key), json.dumps(MESSAGE).encode()))
        assert r.status == 200, r.body
        assert upstream.last_request.path == "/v1/messages"
        assert upstream.last_request.query_string == "beta=true"


async def test_star_does_not_cross_a_segment(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A key scoped to `/v1/messages*` does not reach `/v1/messages/batches`; `**` does."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, star = await gw.issue_key(paths=["/v1/messages*"])
        _, deep = await gw.issue_key(paths=["/v1/messages/**"])
        status, body = await post(gw, star, b"{}", "/v1/messages/batches")
        assert status == 403 and body["error"]["code"] == "path_not_allowed"
        status, _ = await post(gw, deep, b"{}", "/v1/messages/batches")
        assert status != 403


# --- metering -------------------------------------------------------------------------------------

async def test_stream_cut_before_final_usage_is_charged_its_reservation(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A client that reads a stream's first event and hangs up is charged its whole output
    reservation: with otpm 1000 and max_tokens 400, the third such request is refused."""
    upstream.hold_stream = asyncio.Event()
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(otpm=1000)
        body = json.dumps({**MESSAGE, "max_tokens": 400, "stream": True}).encode()
        for i in range(2):
            upstream.first_event_sent.clear()
            head, writer = await open_stream(gw, key, body, b"message_start")
            assert b" 200 " in head.split(b"\r\n", 1)[0]
            await hang_up(writer)  # before message_delta
            await request_lines(gw, i + 1)
        upstream.hold_stream.set()
        status, err = await post(gw, key, body)
        assert status == 429 and err["error"]["code"] == "output_tokens_per_minute"


async def test_openai_stream_without_usage_is_metered(tmp_path: Path,
                                                      upstream: FakeUpstream) -> None:
    """An OpenAI stream that asks for no usage is still metered: the gateway asks the upstream
    for the usage chunk and drops it (and the `usage: null` fields) from the client's stream."""
    upstream.output_tokens = 700
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(otpm=1000)
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                                      default_headers={"X-Forwarded-For": US}) as client:
            stream = await client.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}], stream=True)
            chunks = [c async for c in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            upstream.reply_text)
        assert all(c.choices and c.usage is None for c in chunks)
        sent = upstream.last_request.json()
        assert sent["stream_options"] == {"include_usage": True}
        [line] = await request_lines(gw, 1)
        assert line["output_tokens"] == 700
        # 700 of 1000 spent: a request reserving 400 more is refused.
        status, err = await post(gw, key, json.dumps(
            {"model": "gpt-test-1", "messages": [], "max_tokens": 400}).encode(),
            "/v1/chat/completions")
        assert status == 429 and err["error"]["code"] == "output_tokens_per_minute"


async def test_client_that_asked_for_usage_keeps_its_usage_chunk(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A client that set include_usage gets the usage chunk as the upstream sent it."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                                      default_headers={"X-Forwarded-For": US}) as client:
            stream = await client.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}], stream=True,
                stream_options={"include_usage": True})
            chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == upstream.output_tokens


async def test_max_tokens_must_be_a_positive_integer(tmp_path: Path,
                                                     upstream: FakeUpstream) -> None:
    """`"4096"` is refused with invalid_max_tokens; `4096.0` reserves 4096."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(otpm=5000)
        status, err = await post(gw, key, json.dumps({**MESSAGE, "max_tokens": "4096"}).encode())
        assert status == 400 and err["error"]["code"] == "invalid_max_tokens"
        upstream.hold_stream = asyncio.Event()
        body = json.dumps({**MESSAGE, "max_tokens": 4096.0, "stream": True}).encode()
        _, writer = await open_stream(gw, key, body, b"message_start")
        # 4096 of 5000 reserved while the stream runs: 1000 more do not fit.
        status, err = await post(gw, key, json.dumps({**MESSAGE, "max_tokens": 1000}).encode())
        assert status == 429 and err["error"]["code"] == "output_tokens_per_minute"
        upstream.hold_stream.set()
        await hang_up(writer)


async def test_no_max_tokens_reserves_the_policy_default(tmp_path: Path,
                                                         upstream: FakeUpstream) -> None:
    """A request without an output maximum reserves `limits.default_max_output_tokens`."""
    from tests.support.gateway import DEFAULT_POLICY
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    policy.setdefault("limits", {})["default_max_output_tokens"] = 800
    upstream.hold_stream = asyncio.Event()
    async with running_gateway(tmp_path, upstream.url, policy) as gw:
        _, key = await gw.issue_key(otpm=1000)
        body = json.dumps({"model": "gpt-test-1", "messages": [], "stream": True}).encode()
        _, writer = await open_stream(gw, key, body, b"data:", "/v1/chat/completions")
        status, err = await post(gw, key, json.dumps({**MESSAGE, "max_tokens": 300}).encode())
        assert status == 429 and err["error"]["code"] == "output_tokens_per_minute"
        upstream.hold_stream.set()
        await hang_up(writer)


async def test_upstream_errors_refund_the_token_reservations(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Five 529s in a row keep no output reservation: the key is not locked out of its
    budget by a provider incident (requests still count toward rpm)."""
    upstream.fail_status = 529
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(otpm=1000, rpm=100)
        body = json.dumps({**MESSAGE, "max_tokens": 600}).encode()
        for _ in range(5):
            status, _ = await post(gw, key, body)
            assert status == 529
        await request_lines(gw, 5)
        upstream.fail_status = None
        status, _ = await post(gw, key, body)
        assert status == 200


# --- bodies ---------------------------------------------------------------------------------------

async def test_unauthenticated_broken_json_is_401(tmp_path: Path, upstream: FakeUpstream) -> None:
    """The key is checked from the headers first: a bad key with a broken body gets 401."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        for key in ("", "gk_nosuchkey_" + "a" * 43):
            status, err = await post(gw, key, b'{"model": ')
            assert status == 401, err
            assert err["error"]["type"] == "authentication_error"


async def test_made_up_key_with_a_stalled_body_is_answered_at_once(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A client that announces 30 MB and sends none with a made-up key gets its 401 without the
    gateway waiting for, or holding, the body; the connection is then closed."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        head = ("POST /v1/messages HTTP/1.1\r\nHost: g\r\nx-api-key: gk_fake_" + "b" * 43 +
                "\r\nContent-Type: application/json\r\nContent-Length: 30000000\r\n\r\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 20)
        assert b" 401 " in status_line
        assert gw.service.pipeline.bodies.held == 0
        rest = await asyncio.wait_for(reader.read(), 30)  # closed by the gateway
        assert b"connection: close" in rest.lower()
        writer.close()


async def test_bodies_in_flight_are_bounded(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Past `server.max_inflight_body_bytes` held at once (a body counts three times while it is
    read and judged), a body gets 503 gateway_overloaded; when the held one is sent the next is
    served."""
    async with running_gateway(tmp_path, upstream.url,
                               server={"max_inflight_body_bytes": 400_000}) as gw:
        _, key = await gw.issue_key()
        big = json.dumps({**MESSAGE, "pad": "x" * 100_000}).encode()
        head = ("POST /v1/messages HTTP/1.1\r\nHost: g\r\nx-api-key: " + key +
                f"\r\nContent-Type: application/json\r\nContent-Length: {len(big)}\r\n\r\n")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
        writer.write(head.encode() + big[:1000])  # holds its reservation, sends slowly
        await writer.drain()
        await poll(lambda: gw.service.pipeline.bodies.held > 0)
        status, err = await post(gw, key, big)
        assert status == 503 and err["error"]["code"] == "gateway_overloaded"
        writer.write(big[1000:])
        await writer.drain()
        assert b" 200 " in await asyncio.wait_for(reader.readline(), 20)
        writer.close()
        await poll(lambda: gw.service.pipeline.bodies.held == 0)
        status, _ = await post(gw, key, big)
        assert status == 200


async def test_a_body_that_does_not_arrive_in_time_is_408(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """`server.body_timeout_s` bounds how long a body may trickle: 408 request_timeout."""
    async with running_gateway(tmp_path, upstream.url, server={"body_timeout_s": 0.5}) as gw:
        _, key = await gw.issue_key()
        head = ("POST /v1/messages HTTP/1.1\r\nHost: g\r\nx-api-key: " + key +
                "\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n{")
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gw.url))
        writer.write(head.encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 20)
        assert b" 408 " in status_line
        [line] = await request_lines(gw, 1)
        assert line["reason"] == "request_timeout" and line["status"] == 408
        assert gw.service.pipeline.bodies.held == 0
        writer.close()
        assert upstream.requests == []


async def test_deeply_nested_json_is_400(tmp_path: Path, upstream: FakeUpstream) -> None:
    """100k-deep nesting is invalid_json, not a 500."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key()
        status, err = await post(gw, key, b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert status == 400 and err["error"]["code"] == "invalid_json"


async def test_gzip_and_deflate_bodies_are_inflated_and_judged(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A gzip or deflate body is inflated, judged (its model against the key's scope) and
    forwarded inflated; other encodings get 415; a bomb past the body limit gets 413."""
    async with running_gateway(tmp_path, upstream.url,
                               upstream={"max_body_bytes": 200_000}) as gw:
        _, key = await gw.issue_key(models=["claude-*"])
        plain = json.dumps(MESSAGE).encode()
        status, _ = await post(gw, key, gzip.compress(plain), **{"content-encoding": "gzip"})
        assert status == 200
        assert upstream.last_request.body == plain
        assert "content-encoding" not in upstream.last_request.headers
        status, _ = await post(gw, key, zlib.compress(plain), **{"content-encoding": "deflate"})
        assert status == 200
        other = json.dumps({**MESSAGE, "model": "gpt-4o"}).encode()
        status, err = await post(gw, key, gzip.compress(other), **{"content-encoding": "gzip"})
        assert status == 403 and err["error"]["code"] == "model_not_allowed"
        status, err = await post(gw, key, plain, **{"content-encoding": "br"})
        assert status == 415 and err["error"]["code"] == "unsupported_content_encoding"
        bomb = gzip.compress(b" " * 10_000_000)
        status, err = await post(gw, key, bomb, **{"content-encoding": "gzip"})
        assert status == 413 and err["error"]["code"] == "request_too_large"
        status, err = await post(gw, key, b"not gzip", **{"content-encoding": "gzip"})
        assert status == 400


# --- log amplification ----------------------------------------------------------------------------

async def test_client_strings_are_clipped_in_logs_and_messages(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A 1 MB model name is cut to a few hundred characters in the 403 message and the log line;
    an unauthenticated one never reaches the log at all."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(models=["claude-*"])
        huge = "m" * 1_000_000
        status, err = await post(gw, "", json.dumps({**MESSAGE, "model": huge}).encode())
        assert status == 401
        status, err = await post(gw, key, json.dumps({**MESSAGE, "model": huge}).encode())
        assert status == 403 and len(err["error"]["message"]) < 600
        lines = await request_lines(gw, 2)
        assert lines[0]["model"] is None
        assert len(lines[1]["model"]) < 300
        assert max(len(raw) for raw in gw.logs.raw) < 4000


# --- model scopes ---------------------------------------------------------------------------------

async def test_model_scope_fails_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A claude-* key: a BOM body or a text/plain body is judged (gpt-4o refused), a body that
    is not JSON is refused, and duplicate "model" keys are refused. Nothing reaches upstream."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(models=["claude-*"])
        gpt = json.dumps({**MESSAGE, "model": "gpt-4o"}).encode()
        status, err = await post(gw, key, b"\xef\xbb\xbf" + gpt)
        assert status == 403 and err["error"]["code"] == "model_not_allowed"
        status, err = await post(gw, key, gpt, **{"content-type": "text/plain"})
        assert status == 403 and err["error"]["code"] == "model_not_allowed"
        status, err = await post(gw, key, b"model=gpt-4o", **{"content-type": "text/plain"})
        assert status == 400 and err["error"]["code"] == "invalid_json"
        dup = b'{"model": "gpt-4o", "model": "claude-test-1", "max_tokens": 5, "messages": []}'
        status, err = await post(gw, key, dup)
        assert status == 400 and err["error"]["code"] == "invalid_json"
        esc = b'{"model": "gpt-4o", "mod\\u0065l": "claude-test-1", "max_tokens": 5}'
        status, err = await post(gw, key, esc)
        assert status == 400 and err["error"]["code"] == "invalid_json"
        status, err = await post(gw, key, json.dumps({**MESSAGE, "model": ["gpt-4o"]}).encode())
        assert status == 400
        assert upstream.requests == []


async def test_model_rule_fails_closed(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A policy rule on the model makes an unreadable body a 400 even for an unscoped key,
    while an unscoped key without model rules may still send a non-JSON body."""
    from tests.support.gateway import DEFAULT_POLICY
    policy = json.loads(json.dumps(DEFAULT_POLICY))
    async with running_gateway(tmp_path, upstream.url, policy) as gw:
        _, key = await gw.issue_key()
        status, _ = await post(gw, key, b"plain text upload", "/v1/files",
                               **{"content-type": "text/plain"})
        assert status != 400
        policy["rules"] = [{"id": "no-gpt", "action": "deny", "reason": "model_blocked",
                            "match": {"model": ["gpt-*"]}}, *policy.get("rules", [])]
        await gw.apply_policy(policy)
        status, err = await post(gw, key, b"plain text upload", "/v1/files",
                                 **{"content-type": "text/plain"})
        assert status == 400 and err["error"]["code"] == "invalid_json"
        status, err = await post(gw, key, b"\xef\xbb\xbf" + json.dumps(
            {**MESSAGE, "model": "gpt-4o"}).encode(), **{"content-type": "text/plain"})
        assert status == 403 and err["error"]["code"] == "model_blocked"


async def test_anthropic_sdk_still_works_with_a_scoped_key(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """The official SDK's ordinary requests pass the stricter body checks."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(models=["claude-*"], paths=["/v1/messages"])
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers={"X-Forwarded-For": US}) as client:
            msg = await client.messages.create(**MESSAGE)
        assert msg.content[0].text == upstream.reply_text  # type: ignore[union-attr]
