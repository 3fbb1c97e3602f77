"""The real `python -m gateway` process: run, keys issue, request log lines on stdout, graceful
SIGTERM with a stream in flight, and check-config exit codes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import anthropic

from tests.support.cli import US, cli, cli_env, gateway_process
from tests.support.gateway import ADMIN_TOKEN, UPSTREAM_KEY, poll, write_config
from tests.support.redis_server import RedisServer
from tests.support.transcript import TRANSCRIPT
from tests.support.upstream import FakeUpstream

MESSAGE = {"model": "claude-test-1", "max_tokens": 64,
           "messages": [{"role": "user", "content": "hi"}]}


async def test_run_serves_sdk_stream_and_logs_json(tmp_path: Path, upstream: FakeUpstream) -> None:
    """A real gateway process serves a key issued by the CLI and logs one JSON request line."""
    async with gateway_process(tmp_path, upstream.url) as gw:
        code, out, err = await cli("keys", "issue", "--reseller", "direct", "--json",
                                   "--config", str(gw.config), cwd=tmp_path)
        assert code == 0, err
        issued = json.loads(out)  # stdout is exactly one JSON document
        assert set(issued) == {"key_id", "key"}
        key = issued["key"]
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers=US) as client:
            async with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
                text = "".join([t async for t in stream.text_stream])
                final = await stream.get_final_message()
        assert text == upstream.reply_text
        assert final.usage.output_tokens == upstream.output_tokens
        assert UPSTREAM_KEY in upstream.last_request.headers.getall("x-api-key")
        [line] = await poll(lambda: gw.events("request"))
        assert line["key_id"] == issued["key_id"] and line["status"] == 200
        assert line["country"] == "US" and line["decision"] == "allow"
        assert line["input_tokens"] == upstream.input_tokens
        assert line["output_tokens"] == upstream.output_tokens
        assert gw.events("gateway_started")
        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.finish() == 0
        raw = "\n".join(gw.raw)
        for secret in (key, UPSTREAM_KEY, ADMIN_TOKEN):
            assert secret not in raw


async def test_sigterm_drains_inflight_stream(tmp_path: Path, upstream: FakeUpstream) -> None:
    """SIGTERM stops new connections, lets a held stream finish when released, then exits 0."""
    hold = asyncio.Event()
    upstream.hold_stream = hold
    try:
        async with gateway_process(tmp_path, upstream.url, shutdown_grace_s=30) as gw:
            code, out, err = await cli("keys", "issue", "--reseller", "direct", "--json",
                                       "--config", str(gw.config), cwd=tmp_path)
            assert code == 0, err
            key = json.loads(out)["key"]
            got_first = asyncio.Event()

            async def consume() -> str:
                async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                                    default_headers=US) as client:
                    async with client.messages.stream(**MESSAGE) as stream:  # type: ignore[arg-type]
                        async for event in stream:
                            if event.type == "message_start":
                                got_first.set()
                        final = await stream.get_final_message()
                block = final.content[0]
                assert block.type == "text"
                return block.text

            task = asyncio.create_task(consume())
            async with asyncio.timeout(15):
                await got_first.wait()
            gw.proc.send_signal(signal.SIGTERM)
            await poll(lambda: gw.events("shutdown_started"), timeout=15)

            async def refused() -> bool:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                except ConnectionRefusedError:
                    return True
                writer.close()
                return False

            await poll(refused, timeout=15)
            # Still draining: the stream is open and the process alive.
            assert not task.done() and gw.returncode is None
            assert not gw.events("shutdown_complete")
            hold.set()
            async with asyncio.timeout(20):
                assert await task == upstream.reply_text
            assert await gw.finish() == 0
            assert gw.events("shutdown_complete")
            [line] = gw.events("request")
            assert line["status"] == 200
            assert line["output_tokens"] == upstream.output_tokens
            assert gw.lines.index(gw.events("request")[0]) < gw.lines.index(
                gw.events("shutdown_complete")[0])
    finally:
        hold.set()


def test_check_config_exit_codes(tmp_path: Path) -> None:
    """check-config exits 0 on a valid file and 2 naming the field on an invalid one."""
    good = write_config(tmp_path, "http://127.0.0.1:9")

    def check(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                               str(path)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60, check=False)

    ok = check(good, cli_env())
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text() + "no_such_field: 1\n")
    res = check(bad, cli_env())
    assert res.returncode == 2
    assert "no_such_field" in res.stderr and "unknown field" in res.stderr

    bad_value = tmp_path / "bad-upstream.yaml"
    bad_value.write_text(good.read_text().replace("http://127.0.0.1:9", "ftp://example"))
    res = check(bad_value, cli_env())
    assert res.returncode == 2 and "upstream.url" in res.stderr

    env = cli_env()
    del env["UPSTREAM_API_KEY"]
    res = check(good, env)
    assert res.returncode == 2
    assert "UPSTREAM_API_KEY" in res.stderr
    assert ADMIN_TOKEN not in res.stderr + res.stdout


STORE_SECRET = "store-pw-5ecret"
USERINFO_SECRET = "upstream-userinfo-5ecret"
# Looked for in every output of the suite, not only in these tests' own.
TRANSCRIPT.constant |= {STORE_SECRET, USERINFO_SECRET}


def test_check_config_redacts_credentials_in_urls(tmp_path: Path) -> None:
    """check-config prints hosts but no password from a store or upstream URL."""
    for store in (f"redis://127.0.0.1:1/0?password={STORE_SECRET}",
                  f"redis://app:{STORE_SECRET}@127.0.0.1:1/0",
                  f"redis+sentinel://:{STORE_SECRET}@127.0.0.1:1,127.0.0.1:2/gwmaster"):
        cfg = write_config(tmp_path, f"https://user:{USERINFO_SECRET}@127.0.0.1:9",
                           store={"url": store})
        res = subprocess.run([sys.executable, "-m", "gateway", "check-config", "--config",
                              str(cfg)], cwd=tmp_path, env=cli_env(), capture_output=True,
                             text=True, timeout=60, check=False)
        assert res.returncode == 0, res.stderr
        assert "127.0.0.1" in res.stdout and "***" in res.stdout
        assert STORE_SECRET not in res.stdout + res.stderr
        assert USERINFO_SECRET not in res.stdout + res.stderr


async def test_gateway_started_redacts_credentials_in_urls(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """The gateway_started line names store and upstream without their credentials."""
    up = upstream.url.replace("http://", f"http://user:{USERINFO_SECRET}@")
    # An ACL user with a password (the default user stays open for the harness's PING).
    acl = ["--user", "app", "on", f">{STORE_SECRET}", "~*", "&*", "+@all"]
    with RedisServer(extra_args=acl) as redis:
        url = f"{redis.url}?username=app&password={STORE_SECRET}"
        async with gateway_process(tmp_path, up, store={"url": url}) as gw:
            [started] = await poll(lambda: gw.events("gateway_started"))
            assert "127.0.0.1" in started["store"] and "***" in started["store"]
            assert "***" in started["upstream"]
            gw.proc.send_signal(signal.SIGTERM)
            assert await gw.finish() == 0
    raw = "\n".join(gw.raw)
    assert STORE_SECRET not in raw and USERINFO_SECRET not in raw
