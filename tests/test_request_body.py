"""gateway.request_body: the in-flight body budget, inflation bounds and strict JSON."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest

from gateway.errors import GatewayError
from gateway.request_body import Body, BodyBudget, inflate, judge_body, parse_json
from gateway.usage import RequestFacts


def test_budget_refuses_past_the_bound_but_always_admits_a_lone_body() -> None:
    """Past the bound a body is refused while others are held; alone, it is always admitted,
    also as it grows chunk by chunk."""
    b = BodyBudget(100)
    assert b.reserve(60) and b.held == 60
    assert not b.reserve(50)
    assert b.reserve(40) and b.held == 100
    b.release(100)
    assert b.reserve(500) and b.reserve(300, own=500) and b.held == 800


def test_judged_body_keeps_only_its_size_and_release_is_once() -> None:
    """After judging, a body holds its own size; release returns it once."""
    b = BodyBudget(1000)
    assert b.reserve(300)
    body = Body(b"x" * 100, 300)
    body.judged(b)
    assert (b.held, body.held) == (100, 100)
    assert body.take() == b"x" * 100 and body.data == b""
    body.release(b)
    body.release(b)
    assert b.held == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_inflate_is_bounded(encoding: str) -> None:
    """A compressed body inflates to its content, and past the limit is a 413."""
    plain = b'{"model": "m"}' * 100
    data = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    assert inflate(data, encoding, 10_000) == plain
    with pytest.raises(GatewayError) as err:
        inflate(data, encoding, 100)
    assert err.value.status == 413


def test_raw_deflate_and_garbage() -> None:
    """Raw deflate (no zlib header) is read; garbage is a 400 invalid_json."""
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw = c.compress(b"{}") + c.flush()
    assert inflate(raw, "deflate", 100) == b"{}"
    with pytest.raises(GatewayError) as err:
        inflate(b"not compressed", "gzip", 100)
    assert err.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"", None), (b"[1, 2]", None), (b'{"a": 1}', {"a": 1}),
     (b'\xef\xbb\xbf{"model": "m"}', {"model": "m"}),
     ('{"model": "m"}'.encode("utf-16"), {"model": "m"})],
)
def test_parse_json_reads_what_the_upstream_reads(data: bytes, expected: object) -> None:
    """Objects parse; other JSON values and empty bodies have nothing to judge; a BOM and
    UTF-16 are read through."""
    assert parse_json("POST", data) == expected


@pytest.mark.parametrize(
    "data",
    [b'{"model": "m", "temperature": NaN}', b'{"model": "m", "x": -Infinity}',
     b'{"model": "\\ud800"}', b'{"model": "m", "max_tokens": 1' + b"0" * 30 + b"}",
     b'{"model": "m", "x": ' + b"[" * 600 + b"]" * 600 + b"}", b'{"a": 1.5e308, "b": 1e-320}'],
)
def test_parse_json_reads_every_body_as_json_does(data: bytes) -> None:
    """The fast parser (orjson) refuses some of these; json's reading decides them all, so a
    body reads the same as before (NaN, a lone surrogate, a 31-digit integer, deep nesting)."""
    expected = json.loads(data)
    got = parse_json("POST", data)
    assert json.dumps(got) == json.dumps(expected)


@pytest.mark.parametrize(
    "data",
    [b'{"model": "a", "model": "b"}', b'{"model": "a", "mod\\u0065l": "b"}',
     b'{"max_tokens": 1, "max_tokens": 9}', b"[" * 100_000, b'{"a": '],
)
def test_parse_json_refuses_what_could_be_read_two_ways(data: bytes) -> None:
    """Duplicate keys (plain or escaped), nesting too deep and broken JSON are ValueErrors."""
    with pytest.raises(ValueError):
        parse_json("POST", data)


def _judge(data: bytes, must_judge: bool = False, ctype: str = "", path: str = "/v1/messages",
           method: str = "POST") -> tuple[Body, object]:
    body = Body(data, len(data))
    try:
        return body, judge_body(method, ctype, body, path, must_judge, 256)
    except GatewayError as err:
        return body, (err.status, err.code, err.message)


def test_judge_body_reads_model_stream_and_output_maximum() -> None:
    """A JSON body gives its model, stream flag and output maximum (the default when it sends
    none) and an input estimate from its size."""
    _, facts = _judge(b'{"model": "claude-3", "stream": true, "max_tokens": 50}')
    assert facts == RequestFacts("claude-3", True, 50, 13)
    _, facts = _judge(b'{"model": "claude-3"}')
    assert facts == RequestFacts("claude-3", False, 256, 5)


@pytest.mark.parametrize(("data", "must_judge", "ctype", "code"), [
    (b'{"model": "a", "model": "b"}', False, "", "invalid_json"),  # reads two ways
    (b"not json", False, "application/json", "invalid_json"),  # claims JSON
    (b' {"model": ', False, "", "invalid_json"),  # looks like JSON
    (b"upload bytes", True, "", "invalid_json"),  # models scoped: must be readable
    (b"[1, 2]", True, "application/json", "invalid_json"),  # models scoped: not an object
    (b'{"model": 5}', True, "", "invalid_json"),  # models scoped: model not a string
    (b'{"model": "m", "max_tokens": "9"}', False, "", "invalid_max_tokens"),
])
def test_judge_body_refuses_what_it_cannot_judge(data: bytes, must_judge: bool, ctype: str,
                                                 code: str) -> None:
    """Broken or ambiguous JSON, a body that does not name its model when models are scoped,
    and an output maximum that is not a positive integer are 400s with their code."""
    _, got = _judge(data, must_judge, ctype)
    assert isinstance(got, tuple) and got[:2] == (400, code)


def test_judge_body_passes_a_non_json_body_nothing_needs_to_judge() -> None:
    """Without model scoping an upload that is not JSON passes, with no model and no output
    estimate; a model that is not a string is not read."""
    _, facts = _judge(b"\x00binary upload", ctype="application/octet-stream")
    assert facts == RequestFacts(None, False, 0, 3)  # 14 bytes, about 4 a token
    _, facts = _judge(b'{"model": 5}')
    assert isinstance(facts, RequestFacts) and facts.model is None


def test_judge_body_asks_an_openai_stream_for_its_usage() -> None:
    """An OpenAI chat stream that did not ask for usage is re-encoded asking for it (and the
    facts say the gateway added it); one that asked is left as sent."""
    body, facts = _judge(b'{"model": "gpt-4o", "stream": true}', path="/v1/chat/completions")
    assert isinstance(facts, RequestFacts) and facts.add_include_usage
    assert json.loads(body.data)["stream_options"] == {"include_usage": True}
    sent = b'{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}'
    body, facts = _judge(sent, path="/v1/chat/completions")
    assert isinstance(facts, RequestFacts) and not facts.add_include_usage
    assert body.data == sent


def test_an_openai_stream_too_deep_to_re_encode_is_a_400() -> None:
    """A stream body orjson reads (up to 1024 levels) but the re-encoding that asks for usage
    cannot write is refused as `invalid_json` in the §6 shape, not a 500."""
    deep = b'{"model": "gpt-x", "stream": true, "x": ' + b"[" * 1010 + b"]" * 1010 + b"}"
    _, got = _judge(deep, path="/v1/chat/completions")
    assert got == (400, "invalid_json", "request body is nested too deeply")
