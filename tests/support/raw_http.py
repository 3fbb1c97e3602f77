"""HTTP/1.1 on a raw socket, for requests exactly as written (no client library tidies them)
and answers read byte for byte: one request's bytes, one response parsed off a stream, and
an exchange of both on a fresh connection."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    """Parse one HTTP/1.1 response (Content-Length or chunked body) off a raw socket."""
    status_line = (await reader.readline()).decode("latin-1")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1", status_line
    headers: list[tuple[str, str]] = []
    while (line := (await reader.readline()).decode("latin-1")) not in ("\r\n", ""):
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    resp = RawResponse(int(status), headers, b"")
    if (resp.header("transfer-encoding") or "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            chunks.append(data[:-2])
        resp.body = b"".join(chunks)
    else:
        resp.body = await reader.readexactly(int(resp.header("content-length") or 0))
    return resp


def raw_request(method: str, path: str, headers: dict[str, str] | list[tuple[str, str]],
                body: bytes = b"") -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *(f"{k}: {v}" for k, v in items)]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def exchange(url: str, data: bytes, responses: int = 1) -> list[RawResponse]:
    """Write `data` on one fresh connection and read `responses` answers from it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(20):
            return [await read_response(reader) for _ in range(responses)]
    finally:
        writer.close()
        await writer.wait_closed()
