"""Token usage read from upstream answers: request estimates and pure parsers for JSON and SSE.

Input tokens count `input_tokens` plus cache writes; cache reads are excluded (DESIGN.md §8).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Usage JSON of a non-streamed answer is only parsed up to this size (bigger bodies are still
# forwarded; they are settled on the estimate).
MAX_BUFFERED_JSON = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What admission needs from a request body."""

    model: str | None
    stream: bool
    max_output_tokens: int
    input_estimate: int


def estimate_request(body: dict[str, Any] | None, body_len: int) -> RequestFacts:
    """Estimate a request's tokens: input from its size (≈ 4 bytes a token), output from
    `max_tokens` / `max_completion_tokens` (the larger if both are sent)."""
    model: str | None = None
    stream = False
    max_out = 0
    if body is not None:
        m = body.get("model")
        model = m if isinstance(m, str) else None
        stream = body.get("stream") is True
        for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
            v = body.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > max_out:
                max_out = v
    return RequestFacts(model, stream, max_out, max(1, body_len // 4) if body_len else 0)


@dataclass(slots=True)
class Usage:
    """Tokens reported by the upstream; None until a report is seen."""

    input_tokens: int | None = None
    output_tokens: int | None = None


def _int(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def usage_from_object(u: Any, into: Usage) -> None:
    """Fold one `usage` object (Anthropic or OpenAI shape) into `into`."""
    if not isinstance(u, dict):
        return
    if "input_tokens" in u or "output_tokens" in u:  # Anthropic
        if "input_tokens" in u:
            into.input_tokens = _int(u.get("input_tokens")) + _int(
                u.get("cache_creation_input_tokens")
            )
        if "output_tokens" in u:
            into.output_tokens = _int(u.get("output_tokens"))
    elif "prompt_tokens" in u or "completion_tokens" in u:  # OpenAI
        details = u.get("prompt_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
        into.input_tokens = max(0, _int(u.get("prompt_tokens")) - cached)
        into.output_tokens = _int(u.get("completion_tokens"))


def usage_from_json(body: bytes) -> Usage:
    """Usage of a non-streamed JSON answer (empty Usage when absent or unparseable)."""
    usage = Usage()
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return usage
    if isinstance(doc, dict):
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
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            return
        if not isinstance(doc, dict):
            return
        msg = doc.get("message")
        if doc.get("type") == "message_start" and isinstance(msg, dict):
            usage_from_object(msg.get("usage"), self.usage)
        else:
            usage_from_object(doc.get("usage"), self.usage)
