"""Lifecycle under load: a SIGHUP reload never cuts a running stream, and SIGTERM drains
readiness first, keeps accepting for `shutdown_drain_s`, then ends what is left at
drain + grace with reason `shutdown`."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic

from tests.support.cli import US, cli, gateway_process
from tests.support.gateway import poll, running_gateway
from tests.support.upstream import FakeUpstream

STREAM = {"model": "claude-test-1", "max_tokens": 64, "stream": True,
          "messages": [{"role": "user", "content": "hi"}]}
OPEN_POLICY: dict[str, Any] = {"version": 1, "default_action": "allow", "rules": [],
                               "resellers": {"direct": {"status": "active"}}}


async def test_stream_longer_than_read_timeout_survives_reload(tmp_path: Path,
                                                               upstream: FakeUpstream) -> None:
    """A stream running across a reload, and for longer than upstream.read_timeout_s after it,
    completes whole; the retired upstream session is closed once that stream has ended."""
    # ~4.5 s of stream against a 3 s read timeout: each 0.3 s gap stays far under the timeout
    # even when a loaded machine stalls the loop for a second or two.
    upstream.chunks = 15
    upstream.event_delay_s = 0.3
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               upstream={"read_timeout_s": 3}) as gw:
        _, key = await gw.issue_key("direct")
        old_session = gw.service.pipeline.snapshot.parts.upstream.session
        reloaded = asyncio.Event()

        async def consume() -> str:
            async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                                default_headers=US) as client:
                async with client.messages.stream(
                        model="claude-test-1", max_tokens=64,
                        messages=[{"role": "user", "content": "hi"}]) as stream:
                    text = "".join([t async for t in stream.text_stream])
                    await stream.get_final_message()
            return text

        task = asyncio.create_task(consume())
        await poll(lambda: upstream.first_event_sent.is_set())
        assert await gw.service.reload()
        reloaded.set()
        assert gw.service.pipeline.snapshot.parts.upstream.session is not old_session
        async with asyncio.timeout(30):
            assert await task == upstream.reply_text
        [line] = gw.logs.requests()
        assert line["status"] == 200 and line["output_tokens"] == upstream.output_tokens
        await poll(lambda: old_session.closed)
        # The new session serves the next request.
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers=US) as client:
            msg = await client.messages.create(model="claude-test-1", max_tokens=64,
                                               messages=[{"role": "user", "content": "hi"}])
        assert msg.usage.output_tokens == upstream.output_tokens
        assert reloaded.is_set()


async def _get(url: str) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.get(
            url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.json(content_type=None)


async def test_sigterm_drains_readiness_then_cuts_at_the_deadline(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """SIGTERM: /readyz answers 503 draining at once while new connections are still served
    for shutdown_drain_s; then the listener refuses, a stream still running at drain + grace
    is cut and logged with reason `shutdown`, and the process exits within drain + grace + 1 s."""
    drain, grace = 5.0, 2.0
    hold = asyncio.Event()  # never set: the stream would run for ever
    upstream.hold_stream = hold
    async with gateway_process(tmp_path, upstream.url, OPEN_POLICY, shutdown_drain_s=drain,
                               shutdown_grace_s=grace, upstream={"read_timeout_s": 60}) as gw:
        code, out, err = await cli("keys", "issue", "--reseller", "direct", "--json",
                                   "--config", str(gw.config), cwd=tmp_path)
        assert code == 0, err
        key = json.loads(out)["key"]
        headers = {"x-api-key": key, **US}
        got_first = asyncio.Event()

        async def stream() -> bytes:
            received = b""
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as s, s.post(
                    gw.url + "/v1/messages", json=STREAM, headers=headers) as r:
                assert r.status == 200
                try:
                    async for chunk in r.content.iter_any():
                        received += chunk
                        got_first.set()
                except aiohttp.ClientPayloadError:
                    pass  # the cut
            return received

        task = asyncio.create_task(stream())
        async with asyncio.timeout(15):
            await got_first.wait()
        gw.proc.send_signal(signal.SIGTERM)
        sent_at = time.monotonic()
        status, body = await poll(lambda: _ready_status(gw.admin_url), timeout=drain)
        assert status == 503 and body["status"] == "draining"

        # A new connection during the drain is served.
        s2, b2 = await _post_once(gw.url, headers)
        assert s2 == 200, b2
        assert time.monotonic() - sent_at < drain, "the drain window was too short to test"

        async def refused() -> bool:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            except ConnectionRefusedError:
                return True
            writer.close()
            return False

        await poll(refused, timeout=drain + grace + 5)
        assert not task.done()  # refusing new connections, still streaming

        async def exited() -> bool:
            return gw.returncode is not None

        await poll(exited, timeout=drain + grace + 1 - (time.monotonic() - sent_at))
        assert await gw.finish() == 0
        async with asyncio.timeout(10):
            received = await task
        assert b"message_start" in received and b"message_stop" not in received
        cut = [x for x in gw.events("request") if x["reason"] == "shutdown"]
        assert len(cut) == 1, "\n".join(gw.raw[-6:])
        assert cut[0]["decision"] == "error" and cut[0]["status"] == 503
        assert cut[0]["upstream_status"] == 200  # the stream, not the request of the drain
        assert not [x for x in gw.events("request") if x["reason"] == "client_disconnected"]
        assert gw.events("shutdown_complete")
    hold.set()


async def _ready_status(admin_url: str) -> tuple[int, Any] | None:
    status, body = await _get(admin_url + "/readyz")
    return (status, body) if status == 503 else None


async def _post_once(url: str, headers: dict[str, str]) -> tuple[int, Any]:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.post(
            url + "/v1/messages", json={**STREAM, "stream": False}, headers=headers,
            timeout=aiohttp.ClientTimeout(total=10)) as r:
        return r.status, await r.json(content_type=None)
