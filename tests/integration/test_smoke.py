"""Smoke: the in-process gateway serves an SDK request end to end."""

from __future__ import annotations

from pathlib import Path

import anthropic

from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream


async def test_sdk_request_through_gateway(tmp_path: Path, upstream: FakeUpstream) -> None:
    """An Anthropic SDK request with a reseller key is forwarded with the upstream credential."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key("direct")
        client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                          default_headers={"X-Forwarded-For": "192.0.2.1"})
        msg = await client.messages.create(model="m", max_tokens=5,
                                           messages=[{"role": "user", "content": "hi"}])
        await client.close()
        assert msg.usage.output_tokens == upstream.output_tokens
        seen = upstream.last_request
        assert key not in str(dict(seen.headers))
        line = gw.logs.requests()[-1]
        assert line["country"] == "US" and line["status"] == 200
