"""Unit tests for tests/support/standin.py: the stand-in model API speaks the Anthropic and
OpenAI wire formats (checked with the official SDKs and on the wire) and its knobs do what
they say."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import anthropic
import openai
import pytest

from tests.support.upstream import FakeUpstream

MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi"}]
CHAT: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "Hi"}]


def _anthropic(upstream: FakeUpstream, timeout: float = 60.0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=upstream.url, api_key="x", max_retries=0, timeout=timeout
    )


def _openai(upstream: FakeUpstream) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=upstream.url + "/v1", api_key="x", max_retries=0)


def _sse_events(raw: str) -> list[tuple[str | None, str]]:
    """(event name, data) of every SSE event in `raw`."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        events.append((name, "\n".join(data)))
    return events


# --- fake upstream: Anthropic format ---


async def test_anthropic_sdk_non_streaming(upstream: FakeUpstream) -> None:
    """The Anthropic SDK parses the Message object, usage and headers the fake answers with."""
    upstream.input_tokens, upstream.output_tokens = 31, 7
    upstream.cache_read_input_tokens, upstream.cache_creation_input_tokens = 5, 3
    async with _anthropic(upstream) as client:
        raw = await client.messages.with_raw_response.create(
            model="claude-test-1", max_tokens=64, messages=MESSAGES
        )
        message = await raw.parse()
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "claude-test-1"
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text == upstream.reply_text
    assert message.usage.input_tokens == 31
    assert message.usage.output_tokens == 7
    assert message.usage.cache_read_input_tokens == 5
    assert message.usage.cache_creation_input_tokens == 3
    assert raw.headers["x-upstream-marker"] == "yes"
    assert raw.headers["request-id"].startswith("req_")
    recorded = upstream.last_request
    assert (recorded.method, recorded.path) == ("POST", "/v1/messages")
    # Depending on the SDK version the key travels as x-api-key or as a bearer token.
    credentials = (recorded.headers.get("x-api-key"), recorded.headers.get("authorization"))
    assert credentials in {("x", None), (None, "Bearer x")}
    assert recorded.json()["max_tokens"] == 64
    assert recorded.completed and not recorded.disconnected


async def test_anthropic_sdk_streaming(upstream: FakeUpstream) -> None:
    """The Anthropic SDK streams the text deltas and reports the final usage."""
    upstream.input_tokens, upstream.output_tokens = 40, 9
    upstream.cache_read_input_tokens, upstream.cache_creation_input_tokens = 6, 2
    upstream.chunks = 5
    async with (
        _anthropic(upstream) as client,
        client.messages.stream(model="claude-test-1", max_tokens=64, messages=MESSAGES) as stream,
    ):
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts == upstream.reply_deltas()
    assert "".join(texts) == upstream.reply_text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 40
    assert final.usage.output_tokens == 9
    assert final.usage.cache_read_input_tokens == 6
    assert final.usage.cache_creation_input_tokens == 2
    await upstream.last_request.wait_finished()
    assert upstream.last_request.completed
    assert upstream.first_event_sent.is_set()


async def test_anthropic_wire_sequence(upstream: FakeUpstream) -> None:
    """A stream carries the exact Anthropic event sequence with cumulative output usage."""
    upstream.chunks, upstream.output_tokens = 3, 11
    body = {"model": "m", "max_tokens": 5, "messages": MESSAGES, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(upstream.url + "/v1/messages", json=body) as response,
    ):
        assert response.status == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = await response.text()
    events = _sse_events(raw)
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == names
    start_usage = payloads[0]["message"]["usage"]
    assert start_usage["output_tokens"] == 1
    assert start_usage["input_tokens"] == upstream.input_tokens
    assert "cache_read_input_tokens" in start_usage
    assert "cache_creation_input_tokens" in start_usage
    assert payloads[-2]["delta"]["stop_reason"] == "end_turn"
    assert payloads[-2]["usage"] == {"output_tokens": 11}


async def test_sdk_list_models(upstream: FakeUpstream) -> None:
    """GET /v1/models answers in the shape of whichever SDK asks."""
    async with _anthropic(upstream) as claude, _openai(upstream) as gpt:
        anthropic_ids = [model.id async for model in claude.models.list()]
        openai_ids = [model.id async for model in gpt.models.list()]
    assert anthropic_ids == openai_ids == list(upstream.models)


# --- fake upstream: OpenAI format ---


async def test_openai_sdk_non_streaming(upstream: FakeUpstream) -> None:
    """The OpenAI SDK parses the chat.completion object and its usage."""
    upstream.input_tokens, upstream.output_tokens = 50, 8
    upstream.cache_read_input_tokens = 20
    async with _openai(upstream) as client:
        completion = await client.chat.completions.create(model="gpt-test-1", messages=CHAT)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == upstream.reply_text
    assert completion.choices[0].finish_reason == "stop"
    usage = completion.usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (50, 8, 58)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 20
    recorded = upstream.last_request
    assert recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == "Bearer x"


async def test_openai_sdk_streaming_with_usage(upstream: FakeUpstream) -> None:
    """With include_usage the OpenAI SDK streams the deltas and a final usage chunk."""
    upstream.input_tokens, upstream.output_tokens, upstream.chunks = 17, 4, 6
    async with _openai(upstream) as client:
        stream = await client.chat.completions.create(
            model="gpt-test-1",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].delta.content for c in chunks if c.choices]
    assert "".join(t or "" for t in texts) == upstream.reply_text
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (17, 4, 21)
    assert all(c.usage is None for c in chunks[:-1])


async def test_openai_streaming_without_usage(upstream: FakeUpstream) -> None:
    """Without include_usage no usage chunk is sent and the stream ends with [DONE]."""
    body = {"model": "gpt-test-1", "messages": CHAT, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(upstream.url + "/v1/chat/completions", json=body) as response,
    ):
        raw = await response.text()
    data = [payload for _, payload in _sse_events(raw)]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(payload) for payload in data[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --- fake upstream: knobs ---


async def test_unknown_path_is_anthropic_404(upstream: FakeUpstream) -> None:
    """Any other path answers 404 in the Anthropic error shape."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(upstream.url + "/v1/nope?a=1") as response,
    ):
        body = await response.json()
    assert response.status == 404
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert upstream.last_request.query_string == "a=1"


async def test_response_headers_include_hop_by_hop_and_marker(upstream: FakeUpstream) -> None:
    """Answers carry request-id, the marker header and hop-by-hop headers to strip."""
    body = {"model": "m", "max_tokens": 5, "messages": MESSAGES}
    async with (
        aiohttp.ClientSession() as session,
        session.post(upstream.url + "/v1/messages", json=body) as response,
    ):
        await response.read()
    assert response.headers["connection"].lower() == "keep-alive"
    assert response.headers["keep-alive"] == "timeout=5"
    assert response.headers["x-upstream-marker"] == "yes"
    assert response.headers["request-id"].startswith("req_")


async def test_fail_status(upstream: FakeUpstream) -> None:
    """With fail_status every request gets that status and the error body verbatim."""
    upstream.fail_status = 500
    async with _anthropic(upstream) as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    assert caught.value.status_code == 500
    assert caught.value.body == {"type": "error", "error": {"type": "api_error", "message": "boom"}}
    assert caught.value.response.headers["x-upstream-marker"] == "yes"
    assert upstream.last_request.completed


async def test_hold_stream_and_client_disconnect(upstream: FakeUpstream) -> None:
    """A held stream delivers its first event; a client cut is recorded as disconnected."""
    upstream.hold_stream = asyncio.Event()
    body = {"model": "m", "max_tokens": 5, "messages": MESSAGES, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(upstream.url + "/v1/messages", json=body)
        first = await response.content.readuntil(b"\n\n")
        assert first.startswith(b"event: message_start\n")
        assert upstream.first_event_sent.is_set()
        recorded = upstream.last_request
        assert not recorded.finished.is_set()
        response.close()  # cut the stream while the upstream still holds it
        await recorded.wait_finished()
    assert recorded.disconnected
    assert not recorded.completed


async def test_response_delay_times_out_client(upstream: FakeUpstream) -> None:
    """response_delay_s makes a client with a short timeout give up; the upstream sees it."""
    upstream.response_delay_s = 30
    async with _anthropic(upstream, timeout=0.2) as client:
        with pytest.raises(anthropic.APITimeoutError):
            await client.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    await upstream.last_request.wait_finished()
    assert upstream.last_request.disconnected


async def test_event_delay_paces_events(upstream: FakeUpstream) -> None:
    """event_delay_s spaces the events out (a lower bound only, never an upper one)."""
    upstream.event_delay_s, upstream.chunks = 0.05, 2
    body = {"model": "m", "messages": CHAT, "stream": True}
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(upstream.url + "/v1/chat/completions", json=body) as response,
    ):
        raw = await response.text()
    events = len(_sse_events(raw))
    assert events == 5  # role, 2 deltas, finish, [DONE]
    assert time.monotonic() - started >= (events - 1) * 0.05


# --- pure helpers ---


def test_split_gives_contiguous_pieces_of_near_equal_length() -> None:
    """The pieces concatenate to the text and their lengths differ by at most one."""
    from tests.support.standin import _split

    pieces = _split("abcdefghij", 4)
    assert pieces == ["abc", "def", "gh", "ij"]
    assert _split("ab", 0) == ["ab"]
    assert "".join(_split("x" * 17, 5)) == "x" * 17


def test_error_body_uses_the_anthropic_type_for_the_status() -> None:
    """Known statuses map to their Anthropic error type, others to api_error."""
    from tests.support.standin import anthropic_error_body

    assert anthropic_error_body(429, "slow") == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow"}}
    assert anthropic_error_body(418, "x")["error"]["type"] == "api_error"
