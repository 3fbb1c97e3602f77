"""No secret in anything the suite's gateways and CLIs showed (runs after every other test):
log lines, error bodies, CLI output and metrics, searched for the upstream key, the admin token,
every reseller key issued and every store password used."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp

from tests.support.gateway import poll, running_gateway
from tests.support.transcript import TRANSCRIPT
from tests.support.upstream import FakeUpstream


async def test_no_secret_in_any_output(tmp_path: Path, upstream: FakeUpstream) -> None:
    """This test's own gateway refuses and serves a few requests (so there is output to search
    even when it runs alone); then every output of the session is clean."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key(models=["claude-*"])
        async with aiohttp.ClientSession() as s:
            for headers, body in (({"x-api-key": key + "x"}, b"{}"),
                                  ({"x-api-key": key}, b'{"model": "gpt-4o"}'),
                                  ({"x-api-key": key}, b'{"model": '),
                                  ({"x-api-key": key}, json.dumps({
                                      "model": "claude-1", "max_tokens": 5,
                                      "messages": []}).encode())):
                async with s.post(gw.url + "/v1/messages", data=body, headers=headers) as r:
                    await r.read()
        await poll(lambda: len(gw.logs.requests()) >= 4)
    TRANSCRIPT.end_test("tests/test_zz_no_secrets.py")
    assert TRANSCRIPT.volume["log"] > 0 and TRANSCRIPT.volume["error_body"] >= 3
    assert TRANSCRIPT.volume["metrics"] > 0
    assert TRANSCRIPT.hits == [], "\n".join(TRANSCRIPT.hits[:20])
