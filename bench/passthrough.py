"""The baseline: a bare aiohttp pass-through proxy (own process), what docs/architecture.md §9
measures the gateway against.

One aiohttp server and one pooled `ClientSession`: read the request, forward method, path,
query, body and headers (hop-by-hop ones dropped), stream the answer back with `iter_any`.
No client-IP, geo, identity, policy, limits, metrics or logging.

    python -m bench.passthrough --port 8788 --upstream http://127.0.0.1:8787
"""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "trailers", "transfer-encoding", "upgrade", "proxy-connection",
})
_DROP_REQUEST = HOP_BY_HOP | {"host", "content-length"}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def _open(app: web.Application) -> None:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=60),
        timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_read=600),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
    )


async def _close(app: web.Application) -> None:
    await app[SESSION].close()


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST)
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    async with request.app[SESSION].request(request.method, url, data=body or None,
                                            headers=headers, allow_redirects=False) as up:
        resp = web.StreamResponse(status=up.status, reason=up.reason)
        for k, v in up.headers.items():
            if k.lower() not in _DROP_RESPONSE:
                resp.headers.add(k, v)
        if up.content_length is not None:
            resp.content_length = up.content_length
        await resp.prepare(request)
        async for chunk in up.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.on_startup.append(_open)
    app.on_cleanup.append(_close)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    args = ap.parse_args()
    try:
        import uvloop  # the gateway runs on uvloop too: same event loop on both sides

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(build_app(args.upstream), host=args.host, port=args.port, access_log=None,
                print=None, backlog=1024)


if __name__ == "__main__":
    main()
