"""Operations end to end: Prometheus metrics after mixed traffic, config reloads (admin API
and SIGHUP) that refuse a broken file and apply a valid one, readiness, and `gateway run
--workers 2` supervising its workers on a real redis-server."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cli import GatewayProcess, child_pids, code_of, pid_alive, send
from tests.support.gateway import issue_key_at, poll, running_gateway, write_config
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
START_S = 30.0  # a subprocess gateway (imports, geo, store) on a loaded machine


async def _scrape(admin_url: str) -> tuple[Samples, str]:
    async with aiohttp.ClientSession() as s, s.get(admin_url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out, text


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return _value(after, name, **labels) - _value(before, name, **labels)


def _requests(decision: str, reason: str, reseller: str, country: str) -> dict[str, str]:
    return {"decision": decision, "reason": reason, "reseller": reseller, "country": country}


async def test_metrics_after_mixed_traffic(tmp_path: Path, upstream: FakeUpstream) -> None:
    """gateway_requests_total counts allow, rule deny, 401, 429 and shadow traffic with bounded
    labels; policy version, geo build epochs, in-flight gauge and histograms are exported."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        key_id, key = await gw.issue_key("direct")
        limited_id, limited = await gw.issue_key("direct", rpm=1)
        before, _ = await _scrape(gw.admin_url)

        results = [
            await send(gw.url, key, ip="192.0.2.1"),         # allow, US
            await send(gw.url, key, ip="198.51.100.5"),      # denied by rule, CN
            await send(gw.url, None, ip="192.0.2.20"),       # 401, GB
            await send(gw.url, limited, ip="192.0.2.50"),    # allow, JP
            await send(gw.url, limited, ip="192.0.2.50"),    # 429, JP
            await send(gw.url, key, ip="203.0.113.35"),      # shadow match, allowed, US
        ]
        assert [(s, code_of(b)) for s, b, _ in results] == [
            (200, None), (403, "unsupported_country_region_territory"),
            (401, "invalid_api_key"), (200, None), (429, "requests_per_minute"), (200, None)]
        assert int(results[4][2]["retry-after"]) >= 1

        # One stream held open upstream: the in-flight gauge sees it.
        upstream.hold_stream = asyncio.Event()
        stream = asyncio.create_task(send(gw.url, key, ip="192.0.2.1", body={
            "model": "claude-test-1", "max_tokens": 5, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}))
        await asyncio.wait_for(upstream.first_event_sent.wait(), 10)
        during, _ = await _scrape(gw.admin_url)
        assert _delta(before, during, "gateway_inflight_requests") == 1
        upstream.hold_stream.set()
        await stream
        after, text = await _scrape(gw.admin_url)

        name = "gateway_requests_total"
        expected = {
            ("allow", "", "direct", "US"): 3,
            ("deny", "unsupported_country_region_territory", "direct", "CN"): 1,
            ("deny", "invalid_api_key", "none", "GB"): 1,
            ("allow", "", "direct", "JP"): 1,
            ("rate_limited", "requests_per_minute", "direct", "JP"): 1,
        }
        for labels, n in expected.items():
            assert _delta(before, after, name, **_requests(*labels)) == n, labels
        total = sum(after[k] - before.get(k, 0.0) for k in after if k[0] == name)
        assert total == 7
        assert _delta(before, after, "gateway_shadow_matches_total",
                      rule="hosting-providers") == 1
        assert _delta(before, after, "gateway_inflight_requests") == 0
        assert _value(after, "gateway_policy_version") == gw.service.policy_version == 1
        epochs = gw.service.geo.build_epochs()
        assert set(epochs) == {"country", "asn", "anonymous_ip"}
        for db, epoch in epochs.items():
            assert _value(after, "gateway_geo_database_build_epoch", database=db) == epoch
        assert _delta(before, after, "gateway_request_duration_seconds_count") == 7
        assert _delta(before, after, "gateway_request_duration_seconds_bucket", le="+Inf") == 7
        assert _delta(before, after, "gateway_upstream_duration_seconds_count") == 4
        assert _delta(before, after, "gateway_upstream_ttfb_seconds_count") == 4
        assert _delta(before, after, "gateway_upstream_responses_total", status="200") == 4
        assert _delta(before, after, "gateway_tokens_total", direction="output",
                      reseller="direct") > 0
        assert _delta(before, after, "gateway_store_duration_seconds_count") >= 4
        # 7 lookups of 5 distinct client addresses: 5 geo cache misses, then 2 hits.
        assert _delta(before, after, "gateway_cache_lookups_total", cache="geo",
                      result="miss") == 5
        assert _delta(before, after, "gateway_cache_lookups_total", cache="geo",
                      result="hit") == 2

        # Bounded labels only: no key ids, customer ids or addresses.
        for (_, sample_labels) in after:
            for label, value in sample_labels:
                assert value not in (key_id, limited_id), label
                try:
                    ipaddress.ip_address(value)
                except ValueError:
                    continue
                raise AssertionError(f"address in label {label}={value}")
        assert key_id not in text and "192.0.2" not in text


def _write_broken(path: Path) -> None:
    path.write_text("listen: [this is not\n  valid: yaml\n")


async def test_admin_reload_refuses_broken_config_and_applies_valid_one(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """POST /admin/reload with a broken file keeps serving under the old config and logs
    config_reload_failed; a valid change (openai rate-limit headers) applies and logs
    config_reloaded; /readyz answers 200 with the policy loaded."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        status, ready = await gw.admin("GET", "/readyz")
        assert status == 200 and ready["status"] == "ready"
        assert ready["checks"]["policy"]["version"] == 1
        _, key = await gw.issue_key("direct")
        cfg = tmp_path / "gateway.yaml"

        await asyncio.to_thread(_write_broken, cfg)
        status, body = await gw.admin("POST", "/admin/reload")
        assert (status, body["error"]["code"]) == (400, "reload_refused")
        failed = gw.logs.events("config_reload_failed")
        assert len(failed) == 1 and failed[0]["path"] == str(cfg) and "YAML" in failed[0]["reason"]
        status, _, headers = await send(gw.url, key)
        assert status == 200 and "anthropic-ratelimit-requests-limit" in headers

        await asyncio.to_thread(write_config, tmp_path, upstream.url, limits_headers="azure")
        status, _ = await gw.admin("POST", "/admin/reload")
        assert status == 400
        assert "limits_headers" in gw.logs.events("config_reload_failed")[-1]["reason"]
        assert gw.service.config.settings.limits_headers == "auto"  # the default stays

        await asyncio.to_thread(write_config, tmp_path, upstream.url, limits_headers="openai")
        status, body = await gw.admin("POST", "/admin/reload")
        assert (status, body) == (200, {"reloaded": True})
        assert gw.logs.events("config_reloaded")[-1]["path"] == str(cfg)
        status, _, headers = await send(gw.url, key)
        assert status == 200
        assert "x-ratelimit-limit-requests" in headers
        assert "anthropic-ratelimit-requests-limit" not in headers
        status, ready = await gw.admin("GET", "/readyz")
        assert status == 200 and ready["status"] == "ready"


async def test_sighup_reload(tmp_path: Path, upstream: FakeUpstream) -> None:
    """SIGHUP to `gateway run` with a broken config keeps serving (config_reload_failed); a
    valid change (log level, openai headers) is applied (config_reloaded)."""
    cfg = write_config(tmp_path, upstream.url)
    with GatewayProcess(cfg) as gw:
        started = await poll(lambda: gw.events("gateway_started"), timeout=START_S)
        url = f"http://127.0.0.1:{started[0]['proxy_port']}"
        admin = f"http://127.0.0.1:{started[0]['admin_port']}"
        _, key = await issue_key_at(admin)
        assert (await send(url, key))[0] == 200

        await asyncio.to_thread(_write_broken, cfg)
        gw.signal(signal.SIGHUP)
        failed = await poll(lambda: gw.events("config_reload_failed"), timeout=10)
        assert failed[0]["reason"]
        status, _, headers = await send(url, key)
        assert status == 200 and "anthropic-ratelimit-requests-limit" in headers

        await asyncio.to_thread(write_config, tmp_path, upstream.url, limits_headers="openai",
                                log={"level": "debug"})
        gw.signal(signal.SIGHUP)
        await poll(lambda: gw.events("config_reloaded"), timeout=10)
        status, _, headers = await send(url, key)
        assert status == 200 and "x-ratelimit-limit-requests" in headers
        assert len(gw.events("gateway_started")) == 1  # same process, no restart
        assert await asyncio.to_thread(gw.stop) == 0
        assert gw.events("shutdown_complete")


async def test_workers_supervised(tmp_path: Path, upstream: FakeUpstream,
                                  redis_server: RedisServer) -> None:
    """`gateway run --workers 2` on Redis: each worker serves (either one alone, after the
    other is killed), a killed worker is restarted, and SIGTERM stops everything cleanly."""
    port, admin_port = free_port(), free_port()
    cfg = write_config(tmp_path, upstream.url, listen=f"127.0.0.1:{port}",
                       admin_listen=f"127.0.0.1:{admin_port}",
                       store={"url": redis_server.url, "key_prefix": "x:",
                              "sync_interval_s": 0.2})
    url = f"http://127.0.0.1:{port}"
    with GatewayProcess(cfg, "--workers", "2") as sup:
        await poll(lambda: len(sup.events("gateway_started")) == 2, timeout=START_S)
        workers = {e["pid"] for e in sup.events("worker_started")}
        assert len(workers) == 2 and child_pids(sup.pid) == workers
        _, key = await issue_key_at(f"http://127.0.0.1:{admin_port}")

        async def all_ok(n: int = 8) -> bool:
            got = [(await send(url, key))[0] for _ in range(n)]
            return got == [200] * n

        await poll(all_ok, timeout=10)  # the other worker learns the key from Redis

        replacements: list[int] = []

        def exited(pid: int) -> list[dict[str, Any]]:
            return [e for e in sup.events("worker_exited") if e["pid"] == pid]

        def new_workers() -> list[int]:
            return sorted(sup.worker_pids() - workers - set(replacements))

        for victim in sorted(workers):
            os.kill(victim, signal.SIGKILL)
            gone = await poll(functools.partial(exited, victim), timeout=10)
            assert gone[0]["code"] == -signal.SIGKILL
            # Until the replacement is up, the survivor alone serves every request.
            assert await all_ok()
            replacements += await poll(new_workers, timeout=10)
            await poll(functools.partial(_started, sup, 2 + len(replacements)),
                       timeout=START_S)
        assert child_pids(sup.pid) == set(replacements)
        assert await all_ok()

        assert len(replacements) == 2
        assert await asyncio.to_thread(sup.stop) == 0  # SIGTERM, then wait
        assert not any(pid_alive(p) for p in [*workers, *replacements])
        assert len(sup.events("shutdown_complete")) == 2


def _started(proc: GatewayProcess, n: int) -> bool:
    """True once `n` gateway processes have reported serving."""
    return len(proc.events("gateway_started")) == n
