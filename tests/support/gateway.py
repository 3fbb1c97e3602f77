"""Run a real GatewayService in-process on free ports, with its log lines captured as dicts."""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from gateway.app import GatewayService
from gateway.request_log import set_log_stream
from gateway.settings import load_settings
from tests.support.transcript import ADMIN_TOKEN, TRANSCRIPT, UPSTREAM_KEY

REPO = Path(__file__).resolve().parents[2]
__all__ = ["ADMIN_TOKEN", "UPSTREAM_KEY"]


class LogCapture(io.StringIO):
    """A text stream that keeps every JSON log line as a dict."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            if line.strip():
                TRANSCRIPT.output("log", line)
                self.raw.append(line)
                self.lines.append(json.loads(line))
        return len(s)

    def flush(self) -> None:
        return None

    def events(self, name: str) -> list[dict[str, Any]]:
        return [x for x in self.lines if x.get("event") == name]

    def requests(self) -> list[dict[str, Any]]:
        return self.events("request")


async def poll(fn: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Call `fn` (sync or async) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def issue_key_at(admin_url: str, reseller: str = "direct", **spec: Any) -> tuple[str, str]:
    """(key id, key) of a key issued through the admin API at `admin_url` (`spec`: its other
    fields); the key is a secret the transcript never shows."""
    async with aiohttp.ClientSession() as s, s.post(
            admin_url + "/admin/keys", json={"reseller": reseller, **spec},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        body = await r.json(content_type=None)
        assert r.status == 201, body
    TRANSCRIPT.secret(body["key"])
    return body["key_id"], body["key"]


class RunningGateway:
    def __init__(self, service: GatewayService, logs: LogCapture, tmp: Path) -> None:
        self.service = service
        self.logs = logs
        self.tmp = tmp
        self.url = f"http://127.0.0.1:{service.proxy_port}"
        self.admin_url = f"http://127.0.0.1:{service.admin_port}"
        self.admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    async def admin(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.request(
            method, self.admin_url + path, headers=self.admin_headers, **kw
        ) as r:
            return r.status, await r.json(content_type=None)

    async def issue_key(self, reseller: str = "direct", **spec: Any) -> tuple[str, str]:
        return await issue_key_at(self.admin_url, reseller, **spec)

    async def issue_known_key(self, reseller: str = "direct", *others: RunningGateway,
                              **spec: Any) -> tuple[str, str]:
        """Issue a key (`spec`: its other fields, its own `quotas` too) and wait until this
        instance and every one of `others` holds it as issued."""
        key_id, key = await self.issue_key(reseller, **spec)
        quotas = spec.get("quotas") or {}
        for inst in (self, *others):
            registry = inst.service.registry

            def known(r: Any = registry) -> bool:
                rec = r.keys.get(key_id)
                return rec is not None and rec.quotas == quotas

            await poll(known, timeout=10.0)
        return key_id, key

    async def apply_policy(self, policy: dict[str, Any]) -> int:
        status, body = await self.admin("PUT", "/admin/policy", data=json.dumps(policy))
        assert status == 200, body
        version: int = body["version"]
        await poll(lambda: self.service.policy_version == version)
        return version


DEFAULT_POLICY: dict[str, Any] = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())


def unique_prefix() -> str:
    """A store key prefix of one test's own (tests share a redis-server and never flush it)."""
    return f"t{uuid.uuid4().hex[:10]}:"


def store_config(request: pytest.FixtureRequest, backend: str, **more: Any) -> dict[str, Any]:
    """The `store:` section of the embedded store (`backend` memory), or of the session's
    redis-server (redis) or Redis Cluster (cluster) under a key prefix of this test alone,
    with the settings `more`."""
    if backend == "memory":
        return {"url": "memory://", **more}
    fixture = {"redis": "redis_server_session", "cluster": "redis_cluster"}[backend]
    return {"url": request.getfixturevalue(fixture).url, "key_prefix": unique_prefix(), **more}


def write_config(tmp: Path, upstream_url: str, policy: dict[str, Any] | None = None,
                 **sections: Any) -> Path:
    """A config file in `tmp` pointing at the demo geo databases and `upstream_url`."""
    geo = REPO / "geo" / "demo"
    cfg: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "upstream": {"url": upstream_url, "connect_timeout_s": 2, "read_timeout_s": 5},
        "geo": {"country_db": str(geo / "Demo-Country.mmdb"),
                "asn_db": str(geo / "Demo-ASN.mmdb"),
                "anonymous_ip_db": str(geo / "Demo-Anonymous-IP.mmdb"),
                # Demo and MaxMind test data carry old build dates: never stale unless a
                # test says so.
                "allow_demo_databases": True, "max_age_days": 36500, "reload_interval_s": 0.2},
        "store": {"url": "memory://", "sync_interval_s": 0.2},
        "policy_file": "policy.yaml",
        "shutdown_grace_s": 5,
        "shutdown_drain_s": 0,  # tests stop at once; the drain has its own tests
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name] = {**cfg[name], **value}
        else:
            cfg[name] = value
    (tmp / "policy.yaml").write_text(yaml.safe_dump(policy or DEFAULT_POLICY))
    path = tmp / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@asynccontextmanager
async def running_gateway(tmp: Path, upstream_url: str, policy: dict[str, Any] | None = None,
                          **sections: Any) -> AsyncIterator[RunningGateway]:
    """Start a gateway on free ports; stop it (gracefully) on exit."""
    tmp.mkdir(parents=True, exist_ok=True)
    path = write_config(tmp, upstream_url, policy, **sections)
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    config = load_settings(str(path), environ=env)
    logs = LogCapture()
    set_log_stream(logs)
    service = GatewayService(config, environ=env)
    _record_error_bodies(service)
    await service.start()
    try:
        yield RunningGateway(service, logs, tmp)
    finally:
        await _record_metrics(service)
        await service.stop()
        set_log_stream(None)


def _record_error_bodies(service: GatewayService) -> None:
    """Every error body the proxy listener renders goes into the transcript (the wrapper is in
    place before `start` registers the handler)."""
    handle = service.pipeline.handle

    async def recording(request: web.Request) -> web.StreamResponse:
        resp = await handle(request)
        if resp.status >= 400 and isinstance(resp, web.Response) and isinstance(
                resp.body, bytes):
            TRANSCRIPT.output("error_body", resp.body.decode("utf-8", "replace"))
        return resp

    service.pipeline.handle = recording  # type: ignore[method-assign]


async def _record_metrics(service: GatewayService) -> None:
    try:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{service.admin_port}/metrics",
                timeout=aiohttp.ClientTimeout(total=10)) as r:
            TRANSCRIPT.output("metrics", await r.text())
    except (aiohttp.ClientError, TimeoutError):
        pass  # the test stopped the listener itself
