"""Token usage read from upstream answers: request estimates and pure parsers for JSON and SSE.

Input tokens count `input_tokens` plus cache writes; cache reads are excluded
(docs/architecture.md §8).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from gateway.jsonio import json_loads

# Usage JSON of a non-streamed answer is only parsed up to this size (bigger bodies are still
# forwarded; they are settled on the estimate).
MAX_BUFFERED_JSON = 8 * 1024 * 1024


#: OpenAI endpoints whose streams carry usage only when `stream_options.include_usage` is set.
OPENAI_USAGE_OPTION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_OUTPUT_MAX_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What admission needs from a request body."""

    model: str | None
    stream: bool
    max_output_tokens: int
    input_estimate: int
    #: the gateway asks the upstream for the usage chunk the client did not ask for, and so
    #: drops it from the client's stream (docs/architecture.md §8)
    add_include_usage: bool = False


def output_maximum(body: dict[str, Any]) -> int | None:
    """The request's output maximum: the larger of `max_tokens` / `max_completion_tokens` /
    `max_output_tokens`; None when none is sent. Raises ValueError for a value that is not a
    positive integer (a float without a fractional part counts as one; a string does not)."""
    best: int | None = None
    for name in _OUTPUT_MAX_FIELDS:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"{name} must be a positive integer")
        if isinstance(v, float):
            if not v.is_integer():
                raise ValueError(f"{name} must be a positive integer")
            v = int(v)
        if v <= 0:
            raise ValueError(f"{name} must be a positive integer")
        if best is None or v > best:
            best = v
    return best


def estimate_request(body: dict[str, Any] | None, body_len: int, path: str = "",
                     default_max_output: int = 0) -> RequestFacts:
    """Estimate a request's tokens: input from its size (≈ 4 bytes a token), output from its
    output maximum, or `default_max_output` for a JSON request that sends none.

    Raises ValueError for an output maximum that is not a positive integer."""
    model: str | None = None
    stream = False
    max_out = 0
    add_usage = False
    if body is not None:
        m = body.get("model")
        model = m if isinstance(m, str) else None
        stream = body.get("stream") is True
        given = output_maximum(body)
        max_out = default_max_output if given is None else given
        if stream and path in OPENAI_USAGE_OPTION_PATHS:
            opts = body.get("stream_options")
            add_usage = opts is None or (isinstance(opts, dict) and opts.get(
                "include_usage") is not True)
    return RequestFacts(model, stream, max_out, max(1, body_len // 4) if body_len else 0,
                        add_usage)


def with_include_usage(body: dict[str, Any]) -> bytes:
    """The request body re-encoded with `stream_options.include_usage: true`."""
    opts = body.get("stream_options")
    body["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def charged_tokens(input_reserved: int, output_reserved: int, usage: Usage | None,
                   refund: bool, metered: bool) -> tuple[int, int]:
    """What a finished request is charged, input and output (docs/architecture.md §8).

    `refund`: the upstream failed before answering or answered an error status: the token
    reservations are returned. `metered`: the answer ended normally and its usage (if any) was
    read whole. Otherwise (client hang-up, upstream cut, timeout, shutdown, an answer too big
    to read) the whole output reservation is charged, never less than what was delivered."""
    if refund:
        return 0, 0
    u = usage or Usage()
    if metered:
        return (u.input_tokens or 0, u.output_tokens or 0)
    in_act = u.input_tokens if u.input_tokens is not None else input_reserved
    if u.output_final and u.output_tokens is not None:
        return in_act, u.output_tokens
    return in_act, max(output_reserved, u.output_tokens or 0)


@dataclass(slots=True)
class Usage:
    """Tokens reported by the upstream; None until a report is seen."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    #: the output count is the upstream's final one (Anthropic `message_delta`, OpenAI's usage
    #: chunk, a whole JSON answer), not a running count such as `message_start`'s
    output_final: bool = field(default=False, compare=False)


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def usage_from_object(u: Any, into: Usage, final: bool = True) -> None:
    """Fold one `usage` object (Anthropic or OpenAI shape) into `into`; `final` says whether
    its output count is the final one."""
    if not isinstance(u, dict):
        return
    if "input_tokens" in u or "output_tokens" in u:  # Anthropic
        if "input_tokens" in u:
            into.input_tokens = _int(u.get("input_tokens")) + _int(
                u.get("cache_creation_input_tokens")
            )
        if "output_tokens" in u:
            into.output_tokens = _int(u.get("output_tokens"))
            into.output_final = into.output_final or final
    elif "prompt_tokens" in u or "completion_tokens" in u:  # OpenAI
        details = u.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        into.input_tokens = max(0, _int(u.get("prompt_tokens")) - cached)
        into.output_tokens = _int(u.get("completion_tokens"))
        into.output_final = into.output_final or final


def usage_from_json(body: bytes) -> Usage:
    """Usage of a non-streamed JSON answer (empty Usage when absent or unparseable)."""
    return read_json_usage(body) or Usage()


def read_json_usage(body: bytes) -> Usage | None:
    """Usage of a non-streamed JSON answer; None when the answer is not a JSON object (then
    nothing says what the upstream generated)."""
    try:
        doc = json_loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    usage = Usage()
    usage_from_object(doc.get("usage"), usage)
    return usage


class SSEUsageParser:
    """Incremental parser of an SSE byte stream that keeps the latest reported usage.

    Anthropic: `message_start` (message.usage) and `message_delta` (usage, cumulative output);
    OpenAI: the final chunk's `usage`. Only `data:` lines mentioning "usage" are decoded.
    """

    __slots__ = ("_buf", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self.usage = Usage()

    def feed(self, chunk: bytes) -> None:
        data = self._buf + chunk if self._buf else chunk
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            line = data[start:nl]
            start = nl + 1
            if line.startswith(b"data:") and b'"usage"' in line:
                self._line(line[5:].strip())
        rest = data[start:]
        # A single line longer than 1 MiB is not usage we could parse; drop it.
        self._buf = rest if len(rest) < 1 << 20 else b""

    def _line(self, payload: bytes) -> None:
        try:
            doc = json_loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
        msg = doc.get("message")
        if doc.get("type") == "message_start" and isinstance(msg, dict):
            usage_from_object(msg.get("usage"), self.usage, final=False)
        elif isinstance(doc.get("response"), dict):  # OpenAI Responses: response.completed
            usage_from_object(doc["response"].get("usage"), self.usage)
        else:
            usage_from_object(doc.get("usage"), self.usage)


_EVENT_END = re.compile(rb"(\r?\n\r?\n)")


class UsageChunkFilter:
    """Removes from an OpenAI stream what the gateway added by asking for usage: the final
    usage-only chunk (`"choices": []`) and the `"usage": null` of every other chunk.

    Fed the upstream's bytes, it returns whole events to pass on (events are held only until
    their terminating blank line)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk if self._buf else chunk
        end = -1
        for m in _EVENT_END.finditer(data, max(0, len(data) - len(chunk) - 4)):
            end = m.end()
        if end < 0:
            self._buf = data
            return b""
        self._buf = data[end:]
        return self._clean(data[:end])

    def flush(self) -> bytes:
        rest, self._buf = self._buf, b""
        return self._clean(rest) if rest else b""

    @staticmethod
    def _clean(events: bytes) -> bytes:
        if b'"usage"' not in events:
            return events
        parts = _EVENT_END.split(events)  # event, separator, event, separator, ..., rest
        out: list[bytes] = []
        for i in range(0, len(parts), 2):
            event = parts[i]
            sep = parts[i + 1] if i + 1 < len(parts) else b""
            if b'"usage"' in event:
                event = event.replace(b',"usage":null', b"").replace(b', "usage": null', b"")
                if b'"usage"' in event and _is_usage_chunk(event):
                    continue
            out.append(event + sep)
        return b"".join(out)


def _is_usage_chunk(event: bytes) -> bool:
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            try:
                doc = json_loads(line[5:].strip())
            except (ValueError, RecursionError):
                return False
            return (isinstance(doc, dict) and doc.get("choices") == []
                    and isinstance(doc.get("usage"), dict))
    return False
