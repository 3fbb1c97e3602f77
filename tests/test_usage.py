"""Tests for gateway.usage: request estimates and the JSON / SSE usage parsers."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from gateway.usage import (
    RequestFacts,
    SSEUsageParser,
    Usage,
    UsageChunkFilter,
    charged_tokens,
    estimate_request,
    usage_from_json,
    with_include_usage,
)

# --- estimate_request ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected_max"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 300}, 300),
        ({"max_tokens": 100, "max_completion_tokens": 300}, 300),
        ({"max_tokens": 500, "max_completion_tokens": 300}, 500),
        ({"max_output_tokens": 64}, 64),
        ({"max_tokens": 4096.0}, 4096),
        ({"max_tokens": None}, 2048),
        ({}, 2048),
    ],
)
def test_estimate_output_is_the_larger_max_tokens(body: dict[str, Any], expected_max: int) -> None:
    """Output reservation is the larger maximum sent (an integral float counts), else the
    policy's default."""
    assert estimate_request(body, 100, default_max_output=2048).max_output_tokens == expected_max


@pytest.mark.parametrize(
    "body",
    [{"max_tokens": True}, {"max_tokens": "4096"}, {"max_tokens": 12.5}, {"max_tokens": -5},
     {"max_tokens": 0}, {"max_tokens": float("inf")}, {"max_tokens": [1]},
     {"max_tokens": 10, "max_completion_tokens": "7"}],
)
def test_estimate_refuses_a_bad_output_maximum(body: dict[str, Any]) -> None:
    """A maximum that is not a positive integer is refused, never reserved as zero."""
    with pytest.raises(ValueError, match="positive integer"):
        estimate_request(body, 100, default_max_output=2048)


@pytest.mark.parametrize(
    ("body_len", "expected"),
    [(0, 0), (1, 1), (3, 1), (4, 1), (7, 1), (8, 2), (4000, 1000), (4003, 1000)],
)
def test_estimate_input_is_quarter_of_size(body_len: int, expected: int) -> None:
    """Input estimate is about one token per four bytes, at least 1 for a non-empty body."""
    assert estimate_request({}, body_len).input_estimate == expected


@pytest.mark.parametrize(
    ("body", "model", "stream"),
    [
        ({"model": "claude-sonnet-4-5", "stream": True}, "claude-sonnet-4-5", True),
        ({"model": "gpt-4o", "stream": False}, "gpt-4o", False),
        ({"model": 42, "stream": "true"}, None, False),
        ({"stream": 1}, None, False),
    ],
)
def test_estimate_reads_model_and_stream(body: dict[str, Any], model: str | None,
                                         stream: bool) -> None:
    """Model must be a string and stream must be literally true."""
    facts = estimate_request(body, 10)
    assert (facts.model, facts.stream) == (model, stream)


def test_estimate_without_body() -> None:
    """A request without a JSON body still gets an input estimate from its size."""
    assert estimate_request(None, 40) == RequestFacts(None, False, 0, 10)


# --- usage_from_json -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        # Anthropic: cache writes count, cache reads do not
        ({"usage": {"input_tokens": 10, "output_tokens": 20}}, Usage(10, 20)),
        ({"usage": {"input_tokens": 10, "cache_creation_input_tokens": 200,
                    "cache_read_input_tokens": 5000, "output_tokens": 20}}, Usage(210, 20)),
        ({"usage": {"input_tokens": 10, "cache_creation_input_tokens": None,
                    "output_tokens": 3}}, Usage(10, 3)),
        ({"usage": {"output_tokens": 3}}, Usage(None, 3)),
        # OpenAI: cached prompt tokens are excluded
        ({"usage": {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207,
                    "prompt_tokens_details": {"cached_tokens": 1024}}}, Usage(176, 7)),
        ({"usage": {"prompt_tokens": 50, "completion_tokens": 5}}, Usage(50, 5)),
        ({"usage": {"prompt_tokens": 50, "completion_tokens": 5,
                    "prompt_tokens_details": None}}, Usage(50, 5)),
        ({"usage": {"prompt_tokens": 5, "completion_tokens": 1,
                    "prompt_tokens_details": {"cached_tokens": 9}}}, Usage(0, 1)),
        # bools and strings are not counts
        ({"usage": {"input_tokens": True, "output_tokens": "9"}}, Usage(0, 0)),
    ],
)
def test_usage_from_json(doc: dict[str, Any], expected: Usage) -> None:
    """Anthropic and OpenAI usage objects give input (minus cache reads) and output tokens."""
    assert usage_from_json(json.dumps(doc).encode()) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00",
        b"[1, 2]",
        b'"usage"',
        b"null",
        b'{"usage": "lots"}',
        b'{"usage": [1]}',
        b'{"usage": {"total": 5}}',
        b'{"no_usage": {"input_tokens": 5}}',
        b'{"usage": {"input_tokens": 5',
    ],
)
def test_usage_from_json_garbage_is_empty(body: bytes) -> None:
    """Unparseable or usage-less answers give an empty Usage, never an exception."""
    assert usage_from_json(body) == Usage()


def test_usage_from_json_deeply_nested_is_empty() -> None:
    """A pathologically nested JSON body is garbage too: empty Usage, no RecursionError."""
    assert usage_from_json(b'{"usage": ' + b"[" * 100_000) == Usage()


# --- SSE streams ---------------------------------------------------------------------------------


def _sse(events: list[tuple[str | None, str]], eol: str = "\n") -> bytes:
    out = []
    for name, data in events:
        if name is not None:
            out.append(f"event: {name}{eol}")
        out.append(f"data: {data}{eol}{eol}")
    return "".join(out).encode()


def _j(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


ANTHROPIC_EVENTS: list[tuple[str | None, str]] = [
    ("message_start", _j({
        "type": "message_start",
        "message": {
            "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "content": [], "model": "claude-sonnet-4-5", "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "cache_creation_input_tokens": 100,
                      "cache_read_input_tokens": 2000, "output_tokens": 1},
        },
    })),
    ("content_block_start", _j({"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}})),
    ("ping", '{"type": "ping"}'),
    ("content_block_delta", _j({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta",
                                          "text": 'Hello, the "usage" word — ünïcode'}})),
    ("message_delta", _j({"type": "message_delta",
                          "delta": {"stop_reason": None, "stop_sequence": None},
                          "usage": {"output_tokens": 6}})),
    ("content_block_delta", _j({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "!"}})),
    ("content_block_stop", _j({"type": "content_block_stop", "index": 0})),
    ("message_delta", _j({"type": "message_delta",
                          "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                          "usage": {"output_tokens": 15}})),
    ("message_stop", _j({"type": "message_stop"})),
]
ANTHROPIC_USAGE = Usage(125, 15)

_CHUNK = {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190,
          "model": "gpt-4o-mini", "system_fingerprint": "fp_44709d6fcb"}
OPENAI_EVENTS: list[tuple[str | None, str]] = [
    (None, _j({**_CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}],
               "usage": None})),
    (None, _j({**_CHUNK, "choices": [{"index": 0, "delta": {"content": "Hello"},
                                      "logprobs": None, "finish_reason": None}],
               "usage": None})),
    (None, _j({**_CHUNK, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": "stop"}], "usage": None})),
    (None, _j({**_CHUNK, "choices": [],
               "usage": {"prompt_tokens": 1200, "completion_tokens": 7, "total_tokens": 1207,
                         "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
                         "completion_tokens_details": {"reasoning_tokens": 0}}})),
    (None, "[DONE]"),
]
OPENAI_USAGE = Usage(176, 7)

STREAMS = {
    "anthropic": (_sse(ANTHROPIC_EVENTS), ANTHROPIC_USAGE),
    "anthropic-crlf": (_sse(ANTHROPIC_EVENTS, "\r\n"), ANTHROPIC_USAGE),
    "openai": (_sse(OPENAI_EVENTS), OPENAI_USAGE),
    "openai-crlf": (_sse(OPENAI_EVENTS, "\r\n"), OPENAI_USAGE),
}


def _parse(chunks: list[bytes]) -> Usage:
    p = SSEUsageParser()
    for c in chunks:
        p.feed(c)
    return p.usage


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_sse_whole_stream(name: str) -> None:
    """A whole Anthropic or OpenAI stream (LF or CRLF) yields the reported usage."""
    data, expected = STREAMS[name]
    assert _parse([data]) == expected


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_sse_split_at_every_byte_boundary(name: str) -> None:
    """Splitting the stream in two at any byte gives the same usage as the whole stream."""
    data, expected = STREAMS[name]
    for i in range(len(data) + 1):
        assert _parse([data[:i], data[i:]]) == expected, f"split at byte {i}"


@pytest.mark.parametrize("size", [1, 7])
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_sse_fixed_chunk_sizes(name: str, size: int) -> None:
    """Feeding 1-byte and 7-byte chunks gives the same usage as the whole stream."""
    data, expected = STREAMS[name]
    assert _parse(_chunks(data, size)) == expected


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("name", sorted(STREAMS))
def test_sse_random_chunk_sizes(name: str, seed: int) -> None:
    """Random chunk sizes (empty chunks included) give the same usage as the whole stream."""
    data, expected = STREAMS[name]
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(data):
        n = rng.randint(0, 64)
        chunks.append(data[i : i + n])
        i += n
    assert _parse(chunks) == expected


def test_sse_cut_after_message_start() -> None:
    """A stream cut after message_start settles on what was reported so far."""
    data = _sse(ANTHROPIC_EVENTS[:3])
    assert _parse([data]) == Usage(125, 1)


def test_sse_cut_inside_message_delta() -> None:
    """A message_delta line cut in the middle is not counted; earlier reports stand."""
    full = _sse(ANTHROPIC_EVENTS)
    cut = full.rindex(b'"output_tokens":15') + 5
    assert _parse([full[:cut]]) == Usage(125, 6)


def test_sse_without_usage_is_empty() -> None:
    """An OpenAI stream without a usage chunk reports nothing."""
    assert _parse([_sse([OPENAI_EVENTS[0], OPENAI_EVENTS[1], (None, "[DONE]")])]) == Usage()


def test_sse_data_without_space_and_bad_lines() -> None:
    """`data:` without a space is read; malformed usage lines are skipped."""
    data = (
        b'data:{"type":"message_delta","usage":{"output_tokens":4}}\n\n'
        b'data: {"usage": broken\n\n'
        b'data: ["usage"]\n\n'
        b': comment "usage"\n\n'
        b'event: x\ndata: {"type":"message_delta","usage":{"output_tokens":9}}\n\n'
    )
    assert _parse([data]) == Usage(None, 9)


def test_sse_message_start_usage_in_other_events_is_ignored() -> None:
    """Only message_start reads message.usage; other events read the top-level usage."""
    data = _sse([("x", _j({"type": "other", "message": {"usage": {"input_tokens": 99}}}))])
    assert _parse([data]) == Usage()


def test_sse_deeply_nested_usage_line_does_not_raise() -> None:
    """A pathologically nested data line is skipped, not raised out of feed."""
    p = SSEUsageParser()
    p.feed(b'data: {"usage":' + b"[" * 100_000 + b"\n\n")
    p.feed(_sse(ANTHROPIC_EVENTS))
    assert p.usage == ANTHROPIC_USAGE


def test_sse_overlong_line_is_dropped() -> None:
    """A single line over 1 MiB is dropped and parsing continues after it."""
    p = SSEUsageParser()
    p.feed(b"data: " + b"x" * (1 << 20))
    p.feed(b"y" * 10 + b"\n\n")
    p.feed(_sse(OPENAI_EVENTS))
    assert p.usage == OPENAI_USAGE


# --- final usage and what a finished request is charged ------------------------------------------


def test_message_start_output_is_not_final_message_delta_is() -> None:
    """Anthropic's message_start carries a running output count; only message_delta's is final."""
    p = SSEUsageParser()
    p.feed(b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
           b'{"input_tokens":30,"output_tokens":1}}}\n\n')
    assert (p.usage.input_tokens, p.usage.output_tokens, p.usage.output_final) == (30, 1, False)
    p.feed(b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":99}}\n\n')
    assert (p.usage.output_tokens, p.usage.output_final) == (99, True)


def test_openai_usage_chunk_and_responses_completed_are_final() -> None:
    """OpenAI's usage chunk and the Responses API's response.completed carry final usage."""
    p = SSEUsageParser()
    p.feed(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}\n\n')
    assert (p.usage.output_tokens, p.usage.output_final) == (7, True)
    r = SSEUsageParser()
    r.feed(b'data: {"type":"response.completed","response":{"usage":{"input_tokens":4,'
           b'"output_tokens":8}}}\n\n')
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.output_final) == (4, 8, True)


@pytest.mark.parametrize(
    ("usage", "refund", "metered", "expected"),
    [
        (None, True, False, (0, 0)),                       # upstream failed / error status
        (Usage(30, 12, output_final=True), False, True, (30, 12)),   # normal end
        (None, False, True, (0, 0)),                       # a whole answer without usage
        (Usage(30, 1), False, False, (30, 500)),           # cut after message_start
        (None, False, False, (100, 500)),                  # hang-up before any answer
        (Usage(None, 900), False, False, (100, 900)),      # delivered more than reserved
        (Usage(30, 40, output_final=True), False, False, (30, 40)),  # final seen, then cut
    ],
)
def test_charged_tokens(usage: Usage | None, refund: bool, metered: bool,
                        expected: tuple[int, int]) -> None:
    """Refund on upstream failure; reported usage on a normal end; otherwise the whole output
    reservation, never less than what was delivered (docs/architecture.md §8)."""
    assert charged_tokens(100, 500, usage, refund=refund, metered=metered) == expected


def test_include_usage_asked_only_for_openai_streams_that_did_not() -> None:
    """The gateway asks for the usage chunk on OpenAI chat streams whose client did not."""
    chat = "/v1/chat/completions"
    assert estimate_request({"stream": True}, 10, chat).add_include_usage
    assert estimate_request({"stream": True, "stream_options": {"include_usage": False}},
                            10, chat).add_include_usage
    assert not estimate_request({"stream": True, "stream_options": {"include_usage": True}},
                                10, chat).add_include_usage
    assert not estimate_request({"stream": False}, 10, chat).add_include_usage
    assert not estimate_request({"stream": True}, 10, "/v1/messages").add_include_usage
    body: dict[str, Any] = {"model": "gpt-4o", "stream": True, "stream_options": {"x": 1}}
    assert json.loads(with_include_usage(body))["stream_options"] == {"x": 1,
                                                                       "include_usage": True}


def test_usage_chunk_filter_drops_what_the_gateway_asked_for() -> None:
    """The usage-only chunk and the `"usage":null` fields vanish; other bytes pass unchanged,
    whatever the chunk boundaries."""
    events = (b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}],"usage":null}\n\n'
              b'data: {"id":"a","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}'
              b'\n\ndata: [DONE]\n\n')
    expected = b'data: {"id":"a","choices":[{"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    for cut in range(1, len(events)):
        f = UsageChunkFilter()
        out = f.feed(events[:cut]) + f.feed(events[cut:]) + f.flush()
        assert out == expected, cut


def test_usage_chunk_filter_passes_crlf_events_as_they_complete() -> None:
    """Events ended by CRLF CRLF are passed on as each completes, the usage chunk dropped."""
    f = UsageChunkFilter()
    first = b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\r\n\r\n'
    assert f.feed(first) == b'data: {"choices":[{"delta":{"content":"a"}}]}\r\n\r\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\n\r\n'
    assert f.feed(usage + b"data: [DONE]\r\n\r\n") == b"data: [DONE]\r\n\r\n"
    assert f.flush() == b""
