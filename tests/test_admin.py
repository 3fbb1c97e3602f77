"""Unit tests for gateway.admin: the admin listener's token check, probes and error bodies, on
a gateway running in-process."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from gateway.admin import SERVER_HEADER
from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream


async def test_admin_paths_need_the_bearer_token(tmp_path: Path,
                                                 upstream: FakeUpstream) -> None:
    """No token, a wrong token or another scheme is 401 with the admin error body; probes
    need no token; every answer says only `Server: gateway`."""
    async with running_gateway(tmp_path, upstream.url) as gw, aiohttp.ClientSession() as s:
        token = gw.admin_headers["Authorization"].split(" ", 1)[1]
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {token}"}):
            async with s.get(gw.admin_url + "/admin/keys", headers=headers) as r:
                body = await r.json()
                assert r.status == 401, headers
                assert body["error"]["type"] == "admin_error"
                assert token not in await r.text()
                assert r.headers["Server"] == SERVER_HEADER
        for probe in ("/healthz", "/readyz"):
            async with s.get(gw.admin_url + probe) as r:
                assert r.status == 200, probe
        async with s.get(gw.admin_url + "/metrics") as r:
            assert "gateway_requests_total" in await r.text()


async def test_key_operations_answer_with_their_status(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    """Issue is 201 with the key once, show never has it, a bad field is 400, an unknown key
    404."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        key_id, key = await gw.issue_key(models=["claude-*"])
        status, shown = await gw.admin("GET", f"/admin/keys/{key_id}")
        assert status == 200 and shown["key_id"] == key_id
        assert key not in str(shown) and "secret_hash" not in shown
        status, body = await gw.admin("POST", "/admin/keys", json={"reseller": "direct",
                                                                   "rpm": -1})
        assert status == 400 and "rpm" in body["error"]["message"]
        status, _ = await gw.admin("POST", "/admin/keys/0000000000000000/revoke")
        assert status == 404
