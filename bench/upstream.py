"""The benchmark's upstream: a minimal, fast stand-in for `POST /v1/messages` and
`POST /v1/chat/completions` (own process).

Without `x-bench-events` it answers a small fixed Anthropic Messages JSON body. With
`x-bench-events: N` it streams an Anthropic-shaped SSE answer: `message_start` at once, then N
`content_block_delta` events, each after `x-bench-delay-ms` milliseconds and padded with
`x-bench-pad` bytes of text, then `message_delta` (usage) and `message_stop`. A body larger
than 1 MiB is drained without being held and answered with `x-bench-received: <bytes>` and
`x-bench-draining: <most large bodies arriving at once while it arrived>`.

`POST /v1/chat/completions` answers the OpenAI shapes: a fixed chat completion with `usage`, or
with `x-bench-events: N` N chunks (same delay and padding) and then the usage chunk and
`data: [DONE]`.

    python -m bench.upstream --port 8787
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable

from aiohttp import web

MESSAGE = json.dumps({
    "id": "msg_bench0000000000000000000",
    "type": "message",
    "role": "assistant",
    "model": "claude-bench-1",
    "content": [{"type": "text", "text": "Hello from the benchmark upstream."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 9},
}, separators=(",", ":")).encode()


def _event(name: str, data: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


STREAM_HEAD = _event("message_start", {"type": "message_start", "message": {
    "id": "msg_bench0000000000000000000", "type": "message", "role": "assistant",
    "model": "claude-bench-1", "content": [], "stop_reason": None, "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 1}}}) + _event(
    "content_block_start", {"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}})


def _delta(pad: int) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                          "delta": {"type": "text_delta", "text": "x" * pad}})


def _tail(events: int) -> bytes:
    return (_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": "end_turn",
                                                 "stop_sequence": None},
                                       "usage": {"output_tokens": events}})
            + _event("message_stop", {"type": "message_stop"}))


_DELTAS: dict[int, bytes] = {}


#: Bodies above this are drained in chunks and counted (bench.soak's 30 MB bodies), not held.
_DRAIN_ABOVE = 1 << 20
#: Large bodies being received right now (the most seen during each is sent back).
_DRAINING = 0


async def messages(request: web.Request) -> web.StreamResponse:
    length = request.content_length
    if length is not None and length > _DRAIN_ABOVE:
        global _DRAINING
        received = 0
        _DRAINING += 1
        most = _DRAINING
        try:
            async for chunk in request.content.iter_any():
                received += len(chunk)
                most = max(most, _DRAINING)
        finally:
            _DRAINING -= 1
        return web.Response(body=MESSAGE, content_type="application/json",
                            headers={"x-bench-received": str(received),
                                     "x-bench-draining": str(most)})
    await request.read()
    return await _answer(request, MESSAGE, lambda: STREAM_HEAD, _DELTAS, _delta, _tail)


async def _answer(request: web.Request, whole: bytes, head: Callable[[], bytes],
                  deltas: dict[int, bytes], delta_of: Callable[[int], bytes],
                  tail: Callable[[int], bytes]) -> web.StreamResponse:
    """`whole` as JSON, or with `x-bench-events: N` an SSE stream: `head()`, N deltas of
    `x-bench-pad` bytes `x-bench-delay-ms` apart (built once per pad, kept in `deltas`),
    then `tail(N)`."""
    events = request.headers.get("x-bench-events")
    if events is None:
        return web.Response(body=whole, content_type="application/json")
    n = int(events)
    delay = float(request.headers.get("x-bench-delay-ms", "0")) / 1000.0
    pad = int(request.headers.get("x-bench-pad", "8"))
    delta = deltas.get(pad)
    if delta is None:
        delta = deltas[pad] = delta_of(pad)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(head())
    for _ in range(n):
        if delay:
            await asyncio.sleep(delay)
        await resp.write(delta)
    await resp.write(tail(n))
    await resp.write_eof()
    return resp

CHAT = json.dumps({
    "id": "chatcmpl-bench000000000000", "object": "chat.completion", "created": 1700000000,
    "model": "gpt-bench-1",
    "choices": [{"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": "Hello from the benchmark."}}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21},
}, separators=(",", ":")).encode()


def _chunk(data: dict[str, object]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _chat_delta(pad: int) -> bytes:
    return _chunk({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-bench-1",
                   "choices": [{"index": 0, "delta": {"content": "x" * pad},
                                "finish_reason": None}]})


def _chat_tail(events: int) -> bytes:
    return _chunk({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-bench-1", "choices": [],
                   "usage": {"prompt_tokens": 12, "completion_tokens": events,
                             "total_tokens": 12 + events}}) + b"data: [DONE]\n\n"


_CHAT_DELTAS: dict[int, bytes] = {}


async def chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    return await _answer(request, CHAT, lambda: _chat_delta(0), _CHAT_DELTAS, _chat_delta,
                         _chat_tail)

def build_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(build_app(), host=args.host, port=args.port, access_log=None, print=None,
                backlog=1024)


if __name__ == "__main__":
    main()
