"""Unit tests for gateway.pipeline: the stages run by a gateway in-process (a refusal before
the body, the reserved paths)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream


async def test_reserved_paths_and_missing_keys_are_refused_on_the_proxy_listener(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """/healthz and /admin/* are 404 on the proxy listener; a request without a key is 401
    with a request id; neither reaches the upstream."""
    async with running_gateway(tmp_path, upstream.url) as gw, aiohttp.ClientSession() as s:
        for path in ("/healthz", "/admin/keys"):
            async with s.get(gw.url + path) as r:
                assert r.status == 404, path
        async with s.post(gw.url + "/v1/messages", json={"model": "claude-3"}) as r:
            body = await r.json()
            assert r.status == 401
            assert body["error"]["type"] == "authentication_error"
            assert body["request_id"] == r.headers["x-request-id"]
    assert upstream.requests == []
