"""The request body stage: read it within the size, memory and time bounds, inflate it, and
parse it as JSON strictly enough that what the gateway judges is what the upstream reads.

Called only after the key is authenticated (docs/architecture.md §6): an unauthenticated client
never makes the gateway buffer or parse a body."""

from __future__ import annotations

import asyncio
import json
import zlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError, invalid_request
from gateway.jsonio import json_loads
from gateway.usage import RequestFacts, estimate_request, with_include_usage

#: Fields the gateway judges or meters; a body naming one of them twice is refused, since the
#: gateway and the upstream could read different values.
JUDGED_FIELDS = (b'"model"', b'"stream"', b'"max_tokens"', b'"max_completion_tokens"',
                 b'"max_output_tokens"', b'"stream_options"')
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
#: While a body is read and judged the process holds up to three copies of it (the chunks and
#: their join, then the bytes, the decoded text and the parsed document): it is counted three
#: times against the budget until judged, then once until sent upstream.
READ_FACTOR = 3
_INFLATE_CHUNK = 1 << 20


def too_large(limit: int) -> GatewayError:
    return GatewayError(413, "request_too_large", "request_too_large",
                        f"request body exceeds {limit} bytes")


def overloaded() -> GatewayError:
    return GatewayError(503, "overloaded_error", "gateway_overloaded",
                        "too many request bodies in flight; try again shortly",
                        {"retry-after": "1"})


class BodyBudget:
    """Bytes of request bodies held at once by this process (`server.max_inflight_body_bytes`).

    Callers reserve before they read and release when the body is no longer referenced. A body
    is admitted past the bound only when nothing else is held (one body within
    `upstream.max_body_bytes` is always served, as a request larger than a token bucket is)."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, n: int, own: int = 0) -> bool:
        """Reserve `n` more bytes for a body that already holds `own` of the budget."""
        if n and self.held > own and self.held + n > self.limit:
            return False
        self.held += n
        return True

    def release(self, n: int) -> None:
        self.held = max(0, self.held - n)


@dataclass(slots=True)
class Body:
    """A request body as read (and inflated); `held` is what it reserved of the budget."""

    data: bytes
    held: int
    inflated: bool = False

    def judged(self, budget: BodyBudget) -> None:
        """The body was parsed and its parsed copies dropped: keep only its own size."""
        keep = min(self.held, len(self.data))
        budget.release(self.held - keep)
        self.held = keep

    def take(self) -> bytes:
        """The bytes, handed over: this object no longer references them."""
        data, self.data = self.data, b""
        return data

    def release(self, budget: BodyBudget) -> None:
        budget.release(self.held)
        self.held = 0


async def read_body(request: web.Request, limit: int, budget: BodyBudget,
                    timeout_s: float) -> Body:
    """Read the whole body: 413 past `limit`, 503 past the process's in-flight budget, 408
    when it does not arrive within `timeout_s`; gzip/deflate bodies are inflated (the limit
    applies to the inflated size), other encodings get 415."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "", "gzip", "x-gzip", "deflate"):
        raise GatewayError(415, "invalid_request_error", "unsupported_content_encoding",
                           "request Content-Encoding must be gzip, deflate or identity")
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    if not request.body_exists:
        return Body(b"", 0)
    held = 0
    content = request.content
    try:
        if length is not None:
            if not budget.reserve(length * READ_FACTOR):
                raise overloaded()
            held = length * READ_FACTOR
        if length is not None and content.is_eof():
            # The whole body came with the headers (most API calls): no wait, so no timer.
            data = content.read_nowait(-1)
            if len(data) != length:
                raise asyncio.IncompleteReadError(data, length)
        else:
            async with asyncio.timeout(timeout_s):
                if length is not None:
                    data = await content.readexactly(length) if length else b""
                else:
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in content.iter_any():
                        size += len(chunk)
                        if size > limit:
                            raise too_large(limit)
                        if not budget.reserve(len(chunk) * READ_FACTOR, own=held):
                            raise overloaded()
                        held += len(chunk) * READ_FACTOR
                        chunks.append(chunk)
                    data = b"".join(chunks)
    except TimeoutError:
        budget.release(held)
        raise GatewayError(408, "invalid_request_error", "request_timeout",
                           f"request body not received within {timeout_s:g} s") from None
    except asyncio.IncompleteReadError:
        budget.release(held)
        raise ConnectionResetError("client closed the connection mid-body") from None
    except BaseException:
        budget.release(held)
        raise
    if encoding in ("gzip", "x-gzip", "deflate") and data:
        try:
            inflated = inflate(data, encoding, limit)
        except BaseException:
            budget.release(held)
            raise
        if not budget.reserve(len(inflated) * READ_FACTOR, own=held):
            budget.release(held)
            raise overloaded()
        budget.release(held)
        return Body(inflated, len(inflated) * READ_FACTOR, inflated=True)
    return Body(data, held)


def inflate(data: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a gzip or deflate body, never past `limit` bytes (a zip bomb gets 413)."""
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(data, limit + 1)
        if len(out) > limit:
            raise too_large(limit)
        if d.unconsumed_tail or not d.eof:
            raise ValueError("truncated or trailing data")
    except zlib.error:
        if encoding == "deflate":  # some clients send raw deflate without the zlib header
            return _inflate_raw(data, limit)
        raise invalid_request("invalid_json", f"request body is not valid {encoding}") from None
    except ValueError:
        raise invalid_request("invalid_json", f"request body is not valid {encoding}") from None
    return out


def _inflate_raw(data: bytes, limit: int) -> bytes:
    try:
        d = zlib.decompressobj(-zlib.MAX_WBITS)
        out = d.decompress(data, limit + 1)
    except zlib.error:
        raise invalid_request("invalid_json", "request body is not valid deflate") from None
    if len(out) > limit:
        raise too_large(limit)
    if d.unconsumed_tail or not d.eof:
        raise invalid_request("invalid_json", "request body is not valid deflate")
    return out


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise _DuplicateKey("duplicate key")
    return doc


def parse_json(method: str, data: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, None when there is nothing to judge (no body, a method
    without one, or a JSON value that is not an object).

    Raises ValueError (with the reason) for a body that is not JSON, is nested too deeply, or
    repeats a key: a body the gateway cannot read the way the upstream will."""
    if not data or method not in _BODY_METHODS:
        return None
    try:
        # utf-8-sig: a leading BOM is read, not a reason to stop judging; UTF-16/32 bodies
        # are detected by json.loads itself.
        text = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
        doc = json_loads(text)
        if isinstance(doc, dict) and (b"\\u" in data or any(
                data.count(f) > 1 for f in JUDGED_FIELDS)):
            # A judged field named twice (or spelled with escapes): parse again, refusing
            # duplicate keys anywhere. Most bodies never take this path.
            json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey:
        raise ValueError("request body repeats a key") from None
    except RecursionError:
        raise ValueError("request body is nested too deeply") from None
    except ValueError:
        raise ValueError("request body is not valid JSON") from None
    return doc if isinstance(doc, dict) else None


def judge_body(method: str, content_type: str, body: Body, path: str, must_judge: bool,
               default_max_output: int) -> RequestFacts:
    """Judge what the body says: model, stream, output maximum. With `must_judge` (a rule or
    the key scopes models) a body whose model cannot be read is refused; otherwise a body that
    is not JSON and does not claim to be (an upload, say) passes unjudged. An OpenAI stream
    that did not ask for usage gets `body.data` re-encoded asking for it (§8).

    Raises the 400 GatewayError (`invalid_json`, `invalid_max_tokens`)."""
    try:
        doc = parse_json(method, body.data)
    except ValueError as exc:
        if must_judge or "json" in content_type or body.data.lstrip()[:1] in (b"{", b"["):
            raise invalid_request("invalid_json", str(exc)) from None
        doc = None  # not JSON (an upload, say) and nothing needs its model
    if must_judge and doc is not None and "model" in doc and not isinstance(
            doc["model"], str):
        raise invalid_request("invalid_json", "model must be a string")
    if must_judge and doc is None and body.data:
        raise invalid_request("invalid_json", "this key or policy scopes models: the "
                              "request body must be a JSON object naming the model")
    try:
        facts = estimate_request(doc, len(body.data), path, default_max_output)
    except ValueError as exc:
        raise invalid_request("invalid_max_tokens", str(exc)) from None
    if facts.add_include_usage and doc is not None:
        # Re-encoded from the document just parsed, not parsed a second time. orjson reads
        # 1024 levels, json writes fewer: deeper than json goes is refused as json reads it.
        try:
            body.data = with_include_usage(doc)
        except RecursionError:
            raise invalid_request("invalid_json", "request body is nested too deeply") from None
    return facts
