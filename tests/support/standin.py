"""A local stand-in model API speaking the Anthropic and OpenAI wire formats.

`FakeUpstream` serves `POST /v1/messages` (Anthropic Messages), `POST
/v1/chat/completions` (OpenAI chat completions) and `GET /v1/models`, JSON and
server-sent events alike, on a real socket. Tests tune its behaviour through
plain attributes and inspect what it received in `requests`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web
from multidict import CIMultiDict

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"

#: Headers every answer carries, like the real APIs: two hop-by-hop headers a
#: proxy must drop and one end-to-end header it must pass through.
HOP_BY_HOP_HEADERS = {"Connection": "keep-alive", "Keep-Alive": "timeout=5"}
MARKER_HEADER = "x-upstream-marker"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class RecordedRequest:
    """One request as the upstream received it.

    `completed` is true once the whole answer was handed to the transport;
    `disconnected` is true when the client went away first (a cut stream, or a
    client that gave up during `response_delay_s`). `finished` is set when the
    handler is done either way.
    """

    method: str
    path: str
    query_string: str
    headers: CIMultiDict[str]
    body: bytes
    completed: bool = False
    disconnected: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False, compare=False)

    def json(self) -> Any:
        """The body decoded as JSON."""
        return json.loads(self.body)

    async def wait_finished(self) -> None:
        """Wait (10 s at most) until the upstream is done with this request."""
        async with asyncio.timeout(10):
            await self.finished.wait()


_RECORD = web.RequestKey("record", RecordedRequest)


def _split(text: str, parts: int) -> list[str]:
    """Split `text` into `parts` contiguous pieces whose lengths differ by at most one."""
    parts = max(parts, 1)
    size, extra = divmod(len(text), parts)
    pieces: list[str] = []
    start = 0
    for index in range(parts):
        end = start + size + (1 if index < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    """The error body the Anthropic API sends for `status`."""
    return {
        "type": "error",
        "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
    }


class FakeUpstream:
    """A model API on 127.0.0.1 with knobs for usage, pacing and failures.

    Knobs (plain attributes, change them at any time):

    * `input_tokens`, `output_tokens`, `cache_read_input_tokens`,
      `cache_creation_input_tokens`: the usage reported. In the OpenAI format
      `input_tokens` is `prompt_tokens` (OpenAI's total, cached included),
      `cache_read_input_tokens` is `prompt_tokens_details.cached_tokens` and
      cache writes are not reported.
    * `reply_text` and `chunks`: the answer, streamed as `chunks` deltas that
      concatenate to `reply_text`.
    * `event_delay_s`: pause between SSE events; `response_delay_s`: pause
      before answering at all (timeouts).
    * `fail_status`: when set, every request is answered with that status,
      `fail_body` (default: Anthropic's error shape, message "boom") and
      `fail_headers`.
    * `hold_stream`: when set, a stream pauses after its first event until
      the event is set. `first_event_sent` is set once a first event has
      been flushed.
    * `full_delta_usage`: when true, Anthropic `message_delta` usage also
      carries the input and cache counts, as the current API does.
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Create a stopped upstream; call `start()` or use `async with`. With `ssl_context`
        it speaks HTTPS (`url` is then https://...)."""
        self.ssl_context = ssl_context
        self.input_tokens = 25
        self.output_tokens = 12
        self.cache_read_input_tokens = 0
        self.cache_creation_input_tokens = 0
        self.reply_text = "Hello from the fake upstream, streamed in small pieces."
        self.chunks = 4
        self.event_delay_s = 0.0
        self.response_delay_s = 0.0
        self.fail_status: int | None = None
        self.fail_body: Any = None
        self.fail_headers: dict[str, str] = {}
        self.hold_stream: asyncio.Event | None = None
        self.first_event_sent = asyncio.Event()
        self.full_delta_usage = False
        self.models: Sequence[str] = ("claude-test-1", "gpt-test-1")

        self.requests: list[RecordedRequest] = []
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1 and set `url`."""
        if self._runner is not None:
            raise RuntimeError("FakeUpstream already started")
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/messages", self._anthropic_messages)
        app.router.add_post("/v1/chat/completions", self._openai_chat)
        app.router.add_get("/v1/models", self._models)
        # handler_cancellation: a client that disconnects cancels its handler,
        # which is how a cut stream becomes visible as `disconnected`.
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind(("127.0.0.1", 0))
            site = web.SockSite(runner, sock, ssl_context=self.ssl_context)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = sock.getsockname()[1]
        scheme = "https" if self.ssl_context is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"

    async def close(self) -> None:
        """Stop listening; handlers still running (e.g. held streams) are cancelled within ~1 s."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        """Start and return the upstream."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the upstream."""
        await self.close()

    # -- inspection ------------------------------------------------------

    @property
    def last_request(self) -> RecordedRequest:
        """The most recent request (AssertionError if none arrived)."""
        assert self.requests, "the upstream received no request"
        return self.requests[-1]

    def reply_deltas(self) -> list[str]:
        """The text deltas a stream sends; they concatenate to `reply_text`."""
        return _split(self.reply_text, self.chunks)

    # -- plumbing --------------------------------------------------------

    def _headers(self, content_type: str, *, openai: bool = False) -> dict[str, str]:
        request_id = f"req_{uuid.uuid4().hex}"
        headers = {
            "content-type": content_type,
            "request-id": request_id,
            MARKER_HEADER: "yes",
            **HOP_BY_HOP_HEADERS,
        }
        if openai:
            headers["x-request-id"] = request_id
        return headers

    def _json(self, status: int, body: Any, *, openai: bool = False) -> web.Response:
        return web.Response(
            status=status,
            text=_dumps(body),
            headers=self._headers(JSON_CONTENT_TYPE, openai=openai),
        )

    def _error(self, status: int, message: str) -> web.Response:
        return self._json(status, anthropic_error_body(status, message))

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query_string=request.query_string,
            headers=CIMultiDict(request.headers),
            body=b"",
        )
        self.requests.append(record)
        request[_RECORD] = record
        try:
            record.body = await request.read()
            if self.response_delay_s > 0:
                await asyncio.sleep(self.response_delay_s)
            if self.fail_status is not None:
                response: web.StreamResponse = self._failure(self.fail_status)
            else:
                try:
                    response = await handler(request)
                except web.HTTPException as exc:
                    response = self._error(exc.status, exc.reason)
            if not record.disconnected:
                record.completed = True
            return response
        except asyncio.CancelledError:
            record.disconnected = True
            raise
        finally:
            record.finished.set()

    def _failure(self, status: int) -> web.Response:
        body = (
            self.fail_body if self.fail_body is not None else anthropic_error_body(status, "boom")
        )
        response = self._json(status, body)
        response.headers.update(self.fail_headers)
        return response

    def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        record: RecordedRequest = request[_RECORD]
        try:
            body = json.loads(record.body)
        except ValueError:
            return self._error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return self._error(400, "request body must be a JSON object")
        return body

    async def _stream(
        self, request: web.Request, events: Sequence[str], headers: dict[str, str]
    ) -> web.StreamResponse:
        """Write `events` one by one, each flushed on its own, pacing and holding as told."""
        record: RecordedRequest = request[_RECORD]
        response = web.StreamResponse(status=200, headers=headers)
        try:
            await response.prepare(request)
            for index, event in enumerate(events):
                if index and self.event_delay_s > 0:
                    await asyncio.sleep(self.event_delay_s)
                await response.write(event.encode())
                if index == 0:
                    self.first_event_sent.set()
                    if self.hold_stream is not None:
                        await self.hold_stream.wait()
            await response.write_eof()
        except ConnectionResetError:
            record.disconnected = True
        return response

    # -- Anthropic -------------------------------------------------------

    def _anthropic_usage(self) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "output_tokens": self.output_tokens,
        }

    async def _anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return self._error(400, f"{name}: Field required")
        model = str(body["model"])
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        if not body.get("stream"):
            return self._json(
                200,
                {
                    "id": message_id,
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": self.reply_text}],
                    "model": model,
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": self._anthropic_usage(),
                },
            )
        return await self._stream(
            request, self._anthropic_events(message_id, model), self._headers(SSE_CONTENT_TYPE)
        )

    def _anthropic_events(self, message_id: str, model: str) -> list[str]:
        def event(name: str, data: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {_dumps(data)}\n\n"

        start_usage = {**self._anthropic_usage(), "output_tokens": 1}
        delta_usage: dict[str, int] = (
            self._anthropic_usage()
            if self.full_delta_usage
            else {"output_tokens": self.output_tokens}
        )
        message: dict[str, Any] = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        events = [
            event("message_start", {"type": "message_start", "message": message}),
            event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            event("ping", {"type": "ping"}),
        ]
        events += [
            event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
            for text in self.reply_deltas()
        ]
        events += [
            event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": delta_usage,
                },
            ),
            event("message_stop", {"type": "message_stop"}),
        ]
        return events

    # -- OpenAI ----------------------------------------------------------

    def _openai_usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.input_tokens,
            "completion_tokens": self.output_tokens,
            "total_tokens": self.input_tokens + self.output_tokens,
            "prompt_tokens_details": {
                "cached_tokens": self.cache_read_input_tokens,
                "audio_tokens": 0,
            },
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = self._body(request)
        if isinstance(body, web.Response):
            return body
        for name in ("model", "messages"):
            if name not in body:
                return self._error(400, f"Missing required parameter: '{name}'.")
        model = str(body["model"])
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if not body.get("stream"):
            return self._json(
                200,
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": self.reply_text,
                                "refusal": None,
                            },
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": self._openai_usage(),
                    "system_fingerprint": None,
                },
                openai=True,
            )
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        events = self._openai_events(completion_id, model, created, include_usage=include_usage)
        return await self._stream(request, events, self._headers(SSE_CONTENT_TYPE, openai=True))

    def _openai_events(
        self, completion_id: str, model: str, created: int, *, include_usage: bool
    ) -> list[str]:
        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
            }
            if include_usage:
                data["usage"] = None
            data.update(extra)
            return f"data: {_dumps(data)}\n\n"

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        events = [chunk([choice({"role": "assistant", "content": "", "refusal": None})])]
        events += [chunk([choice({"content": text})]) for text in self.reply_deltas()]
        events.append(chunk([choice({}, "stop")]))
        if include_usage:
            events.append(chunk([], usage=self._openai_usage()))
        events.append("data: [DONE]\n\n")
        return events

    # -- models ----------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        # The two providers share the path; the Anthropic SDK always sends
        # anthropic-version, the OpenAI SDK never does.
        if "anthropic-version" in request.headers:
            data = [
                {
                    "type": "model",
                    "id": model,
                    "display_name": model,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for model in self.models
            ]
            return self._json(
                200,
                {
                    "data": data,
                    "has_more": False,
                    "first_id": data[0]["id"] if data else None,
                    "last_id": data[-1]["id"] if data else None,
                },
            )
        return self._json(
            200,
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": 1735689600,
                        "owned_by": "fake-upstream",
                    }
                    for model in self.models
                ],
            },
            openai=True,
        )
