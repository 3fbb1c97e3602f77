"""The gateway benchmark (docs/architecture.md §9), measured against a bare aiohttp pass-through.

    python -m bench.run [--quick] [--requests N] [--concurrency C]

Starts, all on 127.0.0.1 and each in its own process: a minimal upstream (bench.upstream), the
bare pass-through proxy (bench.passthrough), `gateway run` on the embedded store (memory://)
and `gateway run` on a private redis-server. Then, with aiohttp clients in this process:

1. throughput: N admitted requests per target at concurrency C, in interleaved rounds; CPU time
   of the proxy process per request (/proc/<pid>/stat), requests/s, latency p50/p99;
2. Redis round trips per admitted and per policy-denied request: admissions before the answer
   from the gateway's own metric, and what Redis received in untimed batches watched with
   MONITOR, split into the requests' limit scripts and the background flushes
   (bench.redis_monitor);
3. time to first byte of a stream under moderate load (4 at a time), in interleaved rounds:
   gateway TTFB minus pass-through TTFB at p50/p95/p99, and the p99 gap of each round;
4. gateway RSS across many requests and across long streams.

Figures are printed as ratios against the pass-through of the same run (the budget is stated
that way), absolute numbers beside them are noisy. JSON goes to bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml

from bench.load import LoadResult, Variant, percentile, run_load
from bench.procs import REPO, Child, cpu_seconds, free_port, py, rss_bytes, run_bounded, stop_all
from bench.redis_monitor import Monitor

CONFIG = "config/gateway.yaml"
RESULTS = REPO / "bench" / "results" / "latest.json"
ALLOWED_IP = "192.0.2.1"     # a US address in the demo GeoIP data: admitted
DENIED_IP = "198.51.100.5"   # CN in the demo GeoIP data: 403 by the restricted-regions rule
HIGH = 1_000_000_000
MiB = 1024 * 1024
X = "\u00d7"  # multiplication sign
MINUS = "\u2212"

#: After each measured batch: lets the last settlements (sent after the responses) land inside
#: the measured window.
SETTLE_S = 0.05
BUDGET_CPU_RATIO = 1.3
BUDGET_COMMANDS = 15
#: Issue 15: the gateway's added TTFB at p99 within the pass-through's own + 1 ms.
BUDGET_TTFB_VS_PASSTHROUGH_MS = 1.0
#: How long a MONITOR window runs on past its batch: the usage ledger and the screening
#: tallies flush once a second, so the flush of the batch's own traffic lands inside it.
BACKGROUND_WINDOW_S = 2.5
#: RSS growth still called flat. Python's allocator keeps arenas; a leak of even 100 bytes a
#: request shows as 1 MiB per 10,000 requests, buffering a stream as its whole size.
FLAT_RSS_MIB = 2.0

BODY = json.dumps({"model": "claude-bench-1", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Hello, benchmark."}]}).encode()
STREAM_BODY = json.dumps({"model": "claude-bench-1", "max_tokens": 64, "stream": True,
                          "messages": [{"role": "user", "content": "Hello, benchmark."}]}
                         ).encode()


# The Redis gateway's workload (docs/architecture.md §9, issue 15): a reseller that attests its
# customers; key, reseller and customer each with every limit set (high: nothing is refused);
# 16 keys, 64 customers, 256 client addresses behind two hops of X-Forwarded-For (the client,
# then a trusted proxy); the Anthropic and the OpenAI path alternate.
BENCH_RESELLER = "bench"
KEYS_N = 16
CUSTOMERS_N = 64
#: 256 admitted addresses of the demo GeoIP data: 192.0.2.0/26 (US, GB, DE, JP), then clean
#: US and GB IPv6.
CLIENT_ADDRS = ([f"192.0.2.{i}" for i in range(64)]
                + [f"2001:db8:1::{i:x}" for i in range(1, 97)]
                + [f"2001:db8:2::{i:x}" for i in range(1, 97)])
SECOND_HOP = "127.0.0.2"  # a trusted proxy between the client and the load generator
MIX_N = 1024  # variants in the mixed workload (request i uses variant i mod MIX_N)
OPENAI_BODY = json.dumps({"model": "gpt-bench-1", "max_tokens": 64,
                          "messages": [{"role": "user", "content": "Hello, benchmark."}]}
                         ).encode()
OPENAI_STREAM_BODY = json.dumps({"model": "gpt-bench-1", "max_tokens": 64, "stream": True,
                                 "messages": [{"role": "user", "content": "Hello, benchmark."}]}
                                ).encode()


def mixed(base: str, keys: list[str], stream: bool = False,
          extra: dict[str, str] | None = None) -> list[Variant]:
    """The mixed workload against `base` (http://host:port): request i uses key i mod 16,
    customer i mod 64, client address i mod 256 (and a customer address beside it), and
    alternates the Anthropic and the OpenAI path."""
    out: list[Variant] = []
    for i in range(MIX_N):
        key = keys[i % len(keys)]
        h = {"content-type": "application/json",
             "X-Forwarded-For": f"{CLIENT_ADDRS[i % 256]}, {SECOND_HOP}",
             "X-Customer-Id": f"customer-{i % CUSTOMERS_N}",
             "X-Customer-IP": CLIENT_ADDRS[(i * 7 + 3) % 256], **(extra or {})}
        if i % 2 == 0:
            h.update({"x-api-key": key, "anthropic-version": "2023-06-01"})
            out.append((f"{base}/v1/messages", h, STREAM_BODY if stream else BODY))
        else:
            h["authorization"] = f"Bearer {key}"
            out.append((f"{base}/v1/chat/completions", h,
                        OPENAI_STREAM_BODY if stream else OPENAI_BODY))
    return out


@dataclass
class Params:
    requests: int
    concurrency: int
    warmup: int
    rounds: int
    stream_rounds: int
    denied: int
    watched: int
    stream_requests: int
    stream_concurrency: int
    stream_events: int
    stream_delay_ms: float
    mem_requests: int
    long_streams: int
    long_events: int
    long_pad: int
    long_delay_ms: float
    time_budget_s: float


def params(args: argparse.Namespace) -> Params:
    quick = args.quick
    p = Params(
        requests=1000 if quick else 5000,
        concurrency=32,
        warmup=200 if quick else 500,
        rounds=4,
        stream_rounds=8,
        denied=300 if quick else 1000,
        watched=300 if quick else 1000,
        stream_requests=1000 if quick else 3200,
        stream_concurrency=4,
        stream_events=2,
        stream_delay_ms=5.0,
        mem_requests=2000 if quick else 10_000,
        long_streams=4,
        long_events=1000 if quick else 2000,
        long_pad=2048,
        long_delay_ms=1.0,
        time_budget_s=150.0 if quick else 300.0,
    )
    if args.requests:
        p.requests = args.requests
    if args.concurrency:
        p.concurrency = args.concurrency
    return p


@dataclass
class Target:
    name: str
    label: str
    url: str
    child: Child | None            # the process whose CPU is measured (None: no proxy)
    headers: dict[str, str]
    variants: list[Variant] | None = None         # the mixed workload, when it has one
    stream_variants: list[Variant] | None = None
    throughput: LoadResult = field(default_factory=LoadResult)
    cpu_s: float = 0.0
    round_cpu: list[tuple[float, int]] = field(default_factory=list)
    stream: LoadResult = field(default_factory=LoadResult)
    stream_rounds: list[list[float]] = field(default_factory=list)  # TTFBs of each round
    rss: dict[str, Any] = field(default_factory=dict)


# --- processes --------------------------------------------------------------------------------

def _open_log(path: Path) -> IO[bytes]:
    return path.open("wb")


def write_policy(tmp: Path) -> Path:
    """config/policy.yaml with the `direct` reseller's limits raised out of the way."""
    doc = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())
    doc["resellers"]["direct"]["limits"] = {"rpm": HIGH, "itpm": HIGH, "otpm": HIGH,
                                            "concurrency": 100_000}
    every = {"rpm": HIGH, "itpm": HIGH, "otpm": HIGH, "concurrency": 100_000}
    doc["resellers"][BENCH_RESELLER] = {
        "status": "active", "countries": ["US", "GB", "DE", "JP", "FR", "NL"],
        "require_customer": True, "limits": every, "customer_limits": every}
    path = tmp / "policy.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Gateway:
    def __init__(self, name: str, upstream: str, store_url: str, policy: Path, tmp: Path,
                 env: dict[str, str], workers: int = 1) -> None:
        self.name = name
        self.port = free_port()
        self.admin_port = free_port()
        self.store_url = store_url
        self.env = env
        self.log_path = tmp / f"{name}.log"
        self.sets = [f"upstream.url={upstream}", f"listen=127.0.0.1:{self.port}",
                     f"admin_listen=127.0.0.1:{self.admin_port}", f"store.url={store_url}",
                     f"policy_file={policy}", "shutdown_grace_s=2"]
        argv = py("gateway", "run", "--config", CONFIG, "--workers", str(workers))
        for s in self.sets:
            argv += ["--set", s]
        self.child = Child(name, argv, env, _open_log(self.log_path))
        self.key = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/messages"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self) -> None:
        await self.child.start()
        await self.child.wait_http(f"{self.admin_url}/readyz", timeout=30)

    async def issue_key(self) -> None:
        argv = py("gateway", "keys", "issue", "--reseller", "direct", "--name", "bench",
                  "--rpm", str(HIGH), "--itpm", str(HIGH), "--otpm", str(HIGH),
                  "--concurrency", "10000", "--json", "--config", CONFIG,
                  "--set", f"admin_listen=127.0.0.1:{self.admin_port}",
                  "--set", f"store.url={self.store_url}")
        p = await asyncio.create_subprocess_exec(*argv, cwd=REPO, env=self.env,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), 30)
        if p.returncode:
            raise RuntimeError(f"keys issue failed for {self.name}: {err.decode()}")
        self.key = json.loads(out)["key"]
        # A key written straight to Redis reaches the gateway through pub/sub: wait for it.
        deadline = time.monotonic() + 10
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.post(self.url, data=BODY, headers=headers(self.key)) as r:
                    await r.read()
                    if r.status == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: the new key is refused ({r.status})")
                await asyncio.sleep(0.1)

    async def issue_bench_keys(self) -> list[str]:
        """KEYS_N keys of the attesting reseller with every limit set (high), written straight
        to the store; returns them once the gateway admits each."""
        from gateway.key_admin import issue_key
        from gateway.store.redis.store import RedisStore

        store = RedisStore(self.store_url)
        await store.start()
        try:
            keys = []
            for i in range(KEYS_N):
                _, key = await issue_key(store, {
                    "reseller": BENCH_RESELLER, "name": f"bench-{i}", "rpm": HIGH,
                    "itpm": HIGH, "otpm": HIGH, "concurrency": 100_000}, "bench")
                keys.append(key)
        finally:
            await store.close()
        base = self.url.rsplit("/v1/", 1)[0]
        variants = mixed(base, keys)
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as s:
            for u, h, b in variants[:2 * KEYS_N]:  # every key, on both paths
                while True:
                    async with s.post(u, data=b, headers=h) as r:
                        await r.read()
                        if r.status == 200:
                            break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{self.name}: bench key refused ({r.status})")
                    await asyncio.sleep(0.1)
        return keys

    async def metric_values(self) -> tuple[float, float, float]:
        """Admission round trips, socket writes and commands written by the pipelined
        transport so far (the gateway's /metrics)."""
        async with aiohttp.ClientSession() as s, s.get(f"{self.admin_url}/metrics") as r:
            text = await r.text()
        out = []
        for name in ("gateway_store_duration_seconds_count",
                     "gateway_store_socket_writes_total",
                     "gateway_store_commands_written_total"):
            m = re.search(rf"^{name}\s+(\S+)$", text, re.M)
            out.append(float(m.group(1)) if m else 0.0)
        return out[0], out[1], out[2]

    def log_errors(self) -> int:
        n = 0
        with self.log_path.open("rb") as f:
            for line in f:
                if b'"level": "error"' in line or b'"level":"error"' in line:
                    n += 1
        return n


def headers(key: str, ip: str = ALLOWED_IP) -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": "2023-06-01",
            "content-type": "application/json", "X-Forwarded-For": ip}


# --- Redis accounting ---------------------------------------------------------------------------

class RedisProbe:
    """INFO cpu of the private redis-server over one connection of our own."""

    def __init__(self, port: int) -> None:
        import redis.asyncio as aioredis

        self.r = aioredis.Redis(host="127.0.0.1", port=port)

    async def open(self) -> None:
        await self.r.ping()  # connection set up before any snapshot

    async def close(self) -> None:
        await self.r.aclose()

    async def cpu(self) -> float:
        info = await self.r.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


# --- phases -------------------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _expect(res: LoadResult, status: int, what: str) -> None:
    bad = {s: n for s, n in res.statuses.items() if s != status}
    if bad or res.errors:
        raise RuntimeError(f"{what}: expected every answer {status}, got {dict(res.statuses)}"
                           f" and {res.errors} transport errors")


async def phase_throughput(p: Params, targets: list[Target], redis_gw: Target,
                           probe: RedisProbe, gw: dict[str, Gateway]) -> dict[str, Any]:
    for t in targets:
        _expect(await run_load(t.url, p.warmup, p.concurrency, t.headers, BODY,
                               variants=t.variants), 200, f"warm-up of {t.label}")
    per_round = max(1, p.requests // p.rounds)
    adm = writes = written = 0.0
    rcpu = 0.0
    for t in targets:
        if t.child is not None:
            t.rss["before_throughput"] = rss_bytes(t.child.pid)
    for r in range(p.rounds):
        for t in targets:
            log(f"throughput round {r + 1}/{p.rounds}: {t.label}")
            is_redis = t is redis_gw
            if is_redis:
                m0, rc0 = await gw[t.name].metric_values(), await probe.cpu()
            cpu0 = cpu_seconds(t.child.pid) if t.child else 0.0
            res = await run_load(t.url, per_round, p.concurrency, t.headers, BODY,
                                 variants=t.variants)
            await asyncio.sleep(SETTLE_S)
            cpu1 = cpu_seconds(t.child.pid) if t.child else 0.0
            if is_redis:
                m1, rc1 = await gw[t.name].metric_values(), await probe.cpu()
                adm += m1[0] - m0[0]
                writes += m1[1] - m0[1]
                written += m1[2] - m0[2]
                rcpu += rc1 - rc0
            _expect(res, 200, t.label)
            t.cpu_s += cpu1 - cpu0
            t.round_cpu.append((cpu1 - cpu0, res.requests))
            t.throughput.merge(res)
    for t in targets:
        if t.child is not None:
            t.rss["after_throughput"] = rss_bytes(t.child.pid)
    return {"requests": redis_gw.throughput.requests, "admissions": adm, "redis_cpu_s": rcpu,
            "socket_writes": writes, "commands_written": written}


async def phase_denied(p: Params, gws: list[Target], redis_gw: Target,
                       gw: dict[str, Gateway]) -> dict[str, Any]:
    """CPU per policy-denied request of each gateway; on the Redis gateway also its own count
    of admission round trips and of commands its per-request connection wrote."""
    out: dict[str, Any] = {}
    for t in gws:
        h = dict(t.headers, **{"X-Forwarded-For": DENIED_IP})
        _expect(await run_load(t.url, 50, p.concurrency, h, BODY), 403, f"denied, {t.label}")
        log(f"policy-denied requests: {t.label}")
        assert t.child is not None
        m0 = await gw[t.name].metric_values()
        cpu0 = cpu_seconds(t.child.pid)
        res = await run_load(t.url, p.denied, p.concurrency, h, BODY)
        await asyncio.sleep(SETTLE_S)
        cpu1 = cpu_seconds(t.child.pid)
        m1 = await gw[t.name].metric_values()
        _expect(res, 403, f"denied, {t.label}")
        out[t.name] = {"requests": res.requests, "cpu_s": cpu1 - cpu0, "rps": res.rps,
                       "duration_s": res.elapsed_s}
        if t is redis_gw:
            out[t.name].update(admissions=m1[0] - m0[0], commands_written=m1[2] - m0[2])
    return out


async def watched(p: Params, t: Target, port: int, headers_: dict[str, str], status: int,
                  variants: list[Variant] | None) -> dict[str, Any]:
    """One untimed batch against the Redis gateway with MONITOR on (bench.redis_monitor):
    what Redis received during it, split into the limit scripts of requests and the
    background. The window runs on past the batch until the background flush of its traffic
    (once a second) has landed in it."""
    log(f"Redis commands by purpose ({'admitted' if status == 200 else 'policy-denied'}, "
        "MONITOR on)")
    t0 = time.perf_counter()
    async with Monitor(port) as seen:
        res = await run_load(t.url, p.watched, p.concurrency, headers_, BODY, variants=variants)
        await asyncio.sleep(BACKGROUND_WINDOW_S)
    window = time.perf_counter() - t0
    _expect(res, status, f"watched batch, {t.label}")
    n = res.requests
    return {"requests": n, "window_s": round(window, 2),
            "request_calls": {k: round(v / n, 4) for k, v in seen.request_calls.items()},
            "request_calls_per_request": round(sum(seen.request_calls.values()) / n, 4),
            "request_internal_per_request": round(sum(seen.request_internal.values()) / n, 4),
            "request_internal": {k: round(v / n, 4) for k, v in seen.request_internal.items()},
            "background_per_s": round(sum(seen.background.values()) / window, 1),
            "background_per_request": round(sum(seen.background.values()) / n, 2),
            "background_by_command_per_s": {
                k: round(v / window, 1) for k, v in sorted(seen.background.items())},
            "connection_setup": seen.connection_setup, "unattributed": seen.unattributed}


async def phase_redis_purpose(p: Params, t: Target, port: int) -> dict[str, Any]:
    return {"admitted": await watched(p, t, port, t.headers, 200, t.variants),
            "denied": await watched(p, t, port, dict(t.headers, **{"X-Forwarded-For": DENIED_IP}),
                                    403, None)}


async def phase_stream(p: Params, targets: list[Target]) -> None:
    """Streams at a moderate load, the targets taking turns round by round so that other load
    on the machine hits each alike; each round's TTFBs are kept to show the spread."""
    for t in targets:
        h = dict(t.headers, **{"x-bench-events": str(p.stream_events),
                               "x-bench-delay-ms": str(p.stream_delay_ms)})
        _expect(await run_load(t.url, 50, p.stream_concurrency, h, STREAM_BODY, stream=True,
                               variants=t.stream_variants),
                200, f"stream warm-up, {t.label}")
    per_round = max(1, p.stream_requests // p.stream_rounds)
    for r in range(p.stream_rounds):
        log(f"stream TTFB round {r + 1}/{p.stream_rounds}")
        for t in targets:
            h = dict(t.headers, **{"x-bench-events": str(p.stream_events),
                                   "x-bench-delay-ms": str(p.stream_delay_ms)})
            res = await run_load(t.url, per_round, p.stream_concurrency, h, STREAM_BODY,
                                 stream=True, variants=t.stream_variants)
            _expect(res, 200, f"stream, {t.label}")
            t.stream.merge(res)
            t.stream_rounds.append(res.ttfb_s)


async def phase_memory(p: Params, t: Target) -> dict[str, Any]:
    assert t.child is not None
    pid = t.child.pid
    log(f"memory: {p.mem_requests} requests through {t.label}")
    samples = [rss_bytes(pid)]
    steps = 5
    for _ in range(steps):
        res = await run_load(t.url, p.mem_requests // steps, p.concurrency, t.headers, BODY)
        _expect(res, 200, f"memory, {t.label}")
        samples.append(rss_bytes(pid))
    return {"requests": p.mem_requests, "rss_samples": samples,
            "growth": samples[-1] - samples[0]}


async def phase_long_streams(p: Params, t: Target) -> dict[str, Any]:
    assert t.child is not None
    pid = t.child.pid
    log(f"memory: {p.long_streams} long streams through {t.label}")
    h = dict(t.headers, **{"x-bench-events": str(p.long_events),
                           "x-bench-delay-ms": str(p.long_delay_ms),
                           "x-bench-pad": str(p.long_pad)})
    # One short warm-up stream of the same shape, so first-use allocations are not counted.
    _expect(await run_load(t.url, p.long_streams, p.long_streams,
                           dict(h, **{"x-bench-events": "50"}), STREAM_BODY, stream=True),
            200, "long-stream warm-up")
    before = rss_bytes(pid)
    samples: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(rss_bytes(pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        res = await run_load(t.url, p.long_streams, p.long_streams, h, STREAM_BODY,
                             stream=True, timeout_s=120)
    finally:
        done.set()
        await sampler
    _expect(res, 200, "long streams")
    after = rss_bytes(pid)
    return {"streams": p.long_streams, "bytes_streamed": res.body_bytes,
            "duration_s": res.elapsed_s, "rss_before": before, "rss_peak": max([*samples, after]),
            "rss_after": after, "growth": after - before,
            "peak_growth": max([*samples, after]) - before}


# --- the run ------------------------------------------------------------------------------------

async def bench(p: Params) -> dict[str, Any]:
    from tests.support.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN="bench-admin-" + secrets.token_hex(8),
               UPSTREAM_API_KEY="bench-upstream-" + secrets.token_hex(8))
    policy = write_policy(tmp)
    up_port, pt_port = free_port(), free_port()
    upstream = Child("upstream", py("bench.upstream", "--port", str(up_port)), env,
                     _open_log(tmp / "upstream.log"))
    upstream_url = f"http://127.0.0.1:{up_port}"
    passthrough = Child("pass-through", py("bench.passthrough", "--port", str(pt_port),
                                           "--upstream", upstream_url), env,
                        _open_log(tmp / "passthrough.log"))
    redis = RedisServer()
    children: list[Child] = [upstream, passthrough]
    gws: dict[str, Gateway] = {}
    probe: RedisProbe | None = None
    try:
        log("starting upstream, pass-through and redis-server")
        await asyncio.to_thread(redis.start)
        await upstream.start()
        await passthrough.start()
        await upstream.wait_http(f"{upstream_url}/v1/messages", method="POST")
        await passthrough.wait_http(f"http://127.0.0.1:{pt_port}/v1/messages", method="POST")
        for name, store in (("gw-memory", "memory://"), ("gw-redis", redis.url)):
            gws[name] = Gateway(name, upstream_url, store, policy, tmp, env)
            children.append(gws[name].child)
        log("starting the gateways (memory:// and redis://) and issuing keys")
        await asyncio.gather(*(g.start() for g in gws.values()))
        await asyncio.gather(*(g.issue_key() for g in gws.values()))
        bench_keys = await gws["gw-redis"].issue_bench_keys()
        probe = RedisProbe(redis.port)
        await probe.open()

        direct = Target("direct", "upstream, direct", f"{upstream_url}/v1/messages", None,
                        headers("unused"))
        base = Target("passthrough", "aiohttp pass-through",
                      f"http://127.0.0.1:{pt_port}/v1/messages", passthrough, headers("unused"))
        gmem = Target("gw-memory", "gateway, memory://", gws["gw-memory"].url,
                      gws["gw-memory"].child, headers(gws["gw-memory"].key))
        gred = Target("gw-redis", "gateway, redis://", gws["gw-redis"].url,
                      gws["gw-redis"].child, headers(gws["gw-redis"].key))
        # The mixed workload (16 keys, 64 attested customers, 256 addresses behind two hops,
        # both API paths) on the Redis gateway, and the same requests on the baselines.
        stream_extra = {"x-bench-events": str(p.stream_events),
                        "x-bench-delay-ms": str(p.stream_delay_ms)}
        for t, b in ((direct, upstream_url), (base, f"http://127.0.0.1:{pt_port}"),
                     (gred, gws["gw-redis"].url.rsplit("/v1/", 1)[0])):
            t.variants = mixed(b, bench_keys)
            t.stream_variants = mixed(b, bench_keys, stream=True, extra=stream_extra)
        upstream_cpu0 = cpu_seconds(upstream.pid)
        redis_admitted = await phase_throughput(p, [direct, base, gmem, gred], gred, probe, gws)
        upstream_cpu = cpu_seconds(upstream.pid) - upstream_cpu0
        denied = await phase_denied(p, [gmem, gred], gred, gws)
        purpose = await phase_redis_purpose(p, gred, redis.port)
        await phase_stream(p, [direct, base, gmem, gred])
        memory = await phase_memory(p, gmem)
        long_streams = await phase_long_streams(p, gmem)
        errors = {name: g.log_errors() for name, g in gws.items()}
        return report_data(p, [direct, base, gmem, gred], redis_admitted, denied, purpose,
                           memory, long_streams, errors, upstream_cpu)
    finally:
        log("stopping everything")
        if probe is not None:
            await probe.close()
        await stop_all(children)
        await asyncio.to_thread(redis.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def _us(seconds: float, n: int) -> float:
    return seconds / n * 1e6 if n else 0.0


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000.0, 3)


def ttfb_gap(gw: Target, base: Target) -> dict[str, Any]:
    """The gateway's TTFB minus the pass-through's at p50/p95/p99 (over all streams), and the
    p99 gap of each interleaved round: its spread tells noise from a real gap."""
    out: dict[str, Any] = {}
    for q in (50, 95, 99):
        a, b = percentile(gw.stream.ttfb_s, q), percentile(base.stream.ttfb_s, q)
        out[f"p{q}_ms"] = None if a is None or b is None else round((a - b) * 1000.0, 3)
    rounds = []
    for g_round, b_round in zip(gw.stream_rounds, base.stream_rounds, strict=True):
        pg, pb = percentile(g_round, 99), percentile(b_round, 99)
        if pg is not None and pb is not None:
            rounds.append(round((pg - pb) * 1000.0, 3))
    out["p99_ms_by_round"] = rounds
    return out


def report_data(p: Params, targets: list[Target], adm: dict[str, Any], denied: dict[str, Any],
                purpose: dict[str, Any], memory: dict[str, Any], long_streams: dict[str, Any],
                log_errors: dict[str, int], upstream_cpu: float) -> dict[str, Any]:
    by = {t.name: t for t in targets}
    rows: dict[str, Any] = {}
    for t in targets:
        tp, st = t.throughput, t.stream
        rows[t.name] = {
            "label": t.label,
            "requests": tp.requests,
            "cpu_us_per_request": round(_us(t.cpu_s, tp.requests), 1) if t.child else None,
            "rps": round(tp.rps, 1),
            "latency_p50_ms": _ms(percentile(tp.latencies_s, 50)),
            "latency_p99_ms": _ms(percentile(tp.latencies_s, 99)),
            "stream_requests": st.requests,
            "ttfb_p50_ms": _ms(percentile(st.ttfb_s, 50)),
            "ttfb_p95_ms": _ms(percentile(st.ttfb_s, 95)),
            "ttfb_p99_ms": _ms(percentile(st.ttfb_s, 99)),
            "rss_mib": {k: round(v / MiB, 2) for k, v in t.rss.items()},
        }
    base_cpu = rows["passthrough"]["cpu_us_per_request"] or 0.0
    d = by["direct"].stream.ttfb_s
    for name in ("passthrough", "gw-memory", "gw-redis"):
        r = rows[name]
        r["cpu_ratio"] = round(r["cpu_us_per_request"] / base_cpu, 3) if base_cpu else None
        # Per interleaved round, to show the spread (the machine may be shared).
        r["cpu_ratio_by_round"] = [
            round((c / n) / (bc / bn), 3) if bc and n and bn else None
            for (c, n), (bc, bn) in zip(by[name].round_cpu, by["passthrough"].round_cpu,
                                        strict=True)]
        for q in (50, 99):
            a, b = percentile(by[name].stream.ttfb_s, q), percentile(d, q)
            r[f"added_ttfb_p{q}_ms"] = None if a is None or b is None else round(
                (a - b) * 1000.0, 3)
        if name != "passthrough":
            r["ttfb_vs_passthrough"] = ttfb_gap(by[name], by["passthrough"])

    n = adm["requests"]
    pa, pd = purpose["admitted"], purpose["denied"]
    admitted = {
        "admission_calls_per_request": round(adm["admissions"] / n, 4) if n else None,
        "transport_commands_per_request": round(adm["commands_written"] / n, 4) if n else None,
        "redis_cpu_us_per_request": round(_us(adm["redis_cpu_s"], n), 1),
        "socket_writes_per_request": round(adm["socket_writes"] / n, 4) if n else None,
        "commands_per_socket_write": (round(adm["commands_written"] / adm["socket_writes"], 3)
                                      if adm["socket_writes"] else None),
        "limit_script_commands_per_request": round(
            pa["request_calls_per_request"] + pa["request_internal_per_request"], 4),
        **pa,
    }
    dr = denied["gw-redis"]
    denied_redis = {
        "admission_calls_per_request": round(dr["admissions"] / dr["requests"], 4),
        "transport_commands_per_request": round(dr["commands_written"] / dr["requests"], 4),
        **pd,
    }
    denied_cpu = {k: round(_us(v["cpu_s"], v["requests"]), 1) for k, v in denied.items()}

    def ttfb_check(name: str) -> dict[str, Any]:
        return _check(f"TTFB p99, gateway {name[3:]}:// {MINUS} pass-through (ms)",
                      rows[name]["ttfb_vs_passthrough"]["p99_ms"],
                      f"≤ +{BUDGET_TTFB_VS_PASSTHROUGH_MS:g} ms",
                      lambda v: v <= BUDGET_TTFB_VS_PASSTHROUGH_MS, " ms")

    checks = [
        _check("CPU/request, gateway memory:// ÷ pass-through",
               rows["gw-memory"]["cpu_ratio"], f"≤ {BUDGET_CPU_RATIO}{X}",
               lambda v: v <= BUDGET_CPU_RATIO, X),
        _check("CPU/request, gateway redis:// ÷ pass-through",
               rows["gw-redis"]["cpu_ratio"], f"≤ {BUDGET_CPU_RATIO}{X}",
               lambda v: v <= BUDGET_CPU_RATIO, X),
        _check("Redis round trips before the answer / admitted req",
               admitted["admission_calls_per_request"], "= 1",
               lambda v: abs(v - 1.0) < 0.01, ""),
        _check("Redis script calls / admitted req (admit+settle)",
               admitted["request_calls_per_request"], "≤ 2 (admit+settle)",
               lambda v: v <= 2.05, ""),
        _check("Redis commands of the limit scripts / admitted req",
               admitted["limit_script_commands_per_request"], f"≤ {BUDGET_COMMANDS}",
               lambda v: v <= BUDGET_COMMANDS, ""),
        _check("Redis round trips before the answer / denied req",
               max(denied_redis["admission_calls_per_request"],
                   denied_redis["request_calls_per_request"]), "= 0",
               lambda v: abs(v) < 0.01, ""),
        ttfb_check("gw-memory"),
        ttfb_check("gw-redis"),
        _check(f"RSS growth across {memory['requests']:,} requests (MiB)",
               round(memory["growth"] / MiB, 2), f"flat (≤ {FLAT_RSS_MIB} MiB)",
               lambda v: v <= FLAT_RSS_MIB, " MiB"),
        _check(f"RSS growth across {long_streams['streams']} streams of "
               f"{long_streams['bytes_streamed'] / long_streams['streams'] / MiB:.1f} MiB",
               round(long_streams["peak_growth"] / MiB, 2), f"flat (≤ {FLAT_RSS_MIB} MiB)",
               lambda v: v <= FLAT_RSS_MIB, " MiB"),
    ]
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "aiohttp": aiohttp.__version__},
        "params": p.__dict__,
        "checks": checks,
        "targets": rows,
        "redis_admitted": admitted,
        "redis_denied": denied_redis,
        "denied_cpu_us_per_request": denied_cpu,
        "denied_cpu_ratio": {k: round(v / base_cpu, 3) if base_cpu else None
                             for k, v in denied_cpu.items()},
        "memory_requests": {**memory, "rss_samples_mib": [round(x / MiB, 2)
                                                          for x in memory["rss_samples"]]},
        "memory_long_streams": long_streams,
        "upstream_cpu_us_per_request": round(_us(upstream_cpu, sum(
            t.throughput.requests for t in targets)), 1),
        "gateway_log_errors": log_errors,
    }


def _check(name: str, value: float | None, budget: str, ok: Any, unit: str) -> dict[str, Any]:
    return {"check": name, "value": value, "budget": budget, "unit": unit.strip(),
            "ok": None if value is None else bool(ok(value))}


# --- output -------------------------------------------------------------------------------------

def _f(v: Any, fmt: str = "{:.1f}") -> str:
    return "—" if v is None else fmt.format(v)


def render(r: dict[str, Any]) -> str:
    p = r["params"]
    m = r["machine"]
    out = [
        f"Gateway benchmark — {r['when']} — {m['cpus']} CPUs, Python {m['python']}, "
        f"aiohttp {m['aiohttp']}",
        f"{p['requests']:,} requests per target at concurrency {p['concurrency']} "
        f"(+{p['warmup']} warm-up), {p['rounds']} interleaved rounds; streams: "
        f"{p['stream_requests']:,} per target at concurrency {p['stream_concurrency']} in "
        f"{p['stream_rounds']} interleaved rounds, {p['stream_events']} events "
        f"{p['stream_delay_ms']:g} ms apart",
        "",
        "Budget (docs/architecture.md §9), as ratios against the bare aiohttp pass-through of "
        "this run:",
        f"  {'check':<54}{'measured':>12}  {'budget':<22}result",
    ]
    for c in r["checks"]:
        val = "—" if c["value"] is None else (
            f"{c['value']:.2f}{X if c['unit'] == X else ''}")
        res = {True: "ok", False: "OVER", None: "n/a"}[c["ok"]]
        out.append(f"  {c['check']:<54}{val:>12}  {c['budget']:<22}{res}")
    out += ["", "Absolute numbers (noisy: load generator, upstream, proxies and Redis share "
            f"{m['cpus']} CPUs; compare within a run only):",
            f"  {'target':<22}{'CPU µs/req':>11}{'ratio':>8}{'req/s':>9}{'p50 ms':>9}"
            f"{'p99 ms':>9}{'TTFB p50':>10}{'TTFB p99':>10}{'+TTFB p50':>11}{'+TTFB p99':>11}"]
    for row in r["targets"].values():
        out.append(
            f"  {row['label']:<22}{_f(row['cpu_us_per_request']):>11}"
            f"{_f(row.get('cpu_ratio'), '{:.2f}' + X):>8}{_f(row['rps'], '{:.0f}'):>9}"
            f"{_f(row['latency_p50_ms'], '{:.2f}'):>9}{_f(row['latency_p99_ms'], '{:.2f}'):>9}"
            f"{_f(row['ttfb_p50_ms'], '{:.2f}'):>10}{_f(row['ttfb_p99_ms'], '{:.2f}'):>10}"
            f"{_f(row.get('added_ttfb_p50_ms'), '{:+.2f}'):>11}"
            f"{_f(row.get('added_ttfb_p99_ms'), '{:+.2f}'):>11}")
    out.append("  (latencies in ms; TTFB = request sent to first body byte of a stream, "
               f"{p['stream_concurrency']} streams at a time; +TTFB = minus the direct upstream's)")
    t = r["targets"]
    out.append("  CPU ratio per interleaved round: " + "; ".join(
        f"{t[k]['label']} " + " ".join(_f(v, "{:.2f}") for v in t[k]["cpu_ratio_by_round"])
        for k in ("gw-memory", "gw-redis")))
    for k in ("gw-memory", "gw-redis"):
        g = t[k]["ttfb_vs_passthrough"]
        rounds = sorted(g["p99_ms_by_round"])
        out.append(
            f"  TTFB {t[k]['label']} {MINUS} pass-through: p50 {_f(g['p50_ms'], '{:+.2f}')}, "
            f"p95 {_f(g['p95_ms'], '{:+.2f}')}, p99 {_f(g['p99_ms'], '{:+.2f}')} ms; p99 gap "
            f"per round (sorted) " + " ".join(f"{v:+.2f}" for v in rounds))
    a, dn = r["redis_admitted"], r["redis_denied"]

    def bg(x: dict[str, Any]) -> str:
        top = sorted(x["background_by_command_per_s"].items(), key=lambda kv: -kv[1])
        return (f"{x['background_per_s']:.1f} commands/s over {x['window_s']:.1f} s ("
                + ", ".join(f"{k} {v:.1f}" for k, v in top[:8])
                + (", ..." if len(top) > 8 else "") + ")")

    out += ["",
            f"  Redis, admitted (MONITOR, {a['requests']} requests): limit-script calls "
            f"{a['request_calls_per_request']:.3f}/request ("
            + ", ".join(f"{k} {v:.3f}" for k, v in sorted(a["request_calls"].items()))
            + f") running {a['request_internal_per_request']:.3f} commands inside Redis; "
            f"admission before the answer {_f(a['admission_calls_per_request'], '{:.3f}')} "
            "(gateway_store_duration_seconds_count)",
            "  Redis background, not per request (usage ledger and screening flushes, key "
            "last-used, sync; once a second): " + bg(a) + f", {a['background_per_request']:.1f}"
            " per admitted request of the window",
            f"  Redis-server CPU {a['redis_cpu_us_per_request']:.1f} µs per admitted request "
            "(background included); pipelined transport: "
            f"{_f(a['socket_writes_per_request'], '{:.3f}')} socket writes/admitted request, "
            f"{_f(a['commands_per_socket_write'], '{:.2f}')} commands per write",
            f"  Redis, policy-denied (MONITOR, {dn['requests']} requests): limit-script calls "
            f"{dn['request_calls_per_request']:.3f}/request, admissions "
            f"{dn['admission_calls_per_request']:.3f}/request, per-request connection "
            f"{dn['transport_commands_per_request']:.3f} commands/request; background apart: "
            + bg(dn),
            "  CPU per policy-denied request (403): " + ", ".join(
                f"{k} {v:.1f} µs ({r['denied_cpu_ratio'][k]:.2f}{X} an admitted pass-through)"
                for k, v in r["denied_cpu_us_per_request"].items()),
            f"  RSS of gateway memory:// across {r['memory_requests']['requests']:,} requests "
            "(MiB): " + " → ".join(f"{x:.1f}" for x in r["memory_requests"]["rss_samples_mib"]),
            ]
    ls = r["memory_long_streams"]
    out.append(f"  RSS across {ls['streams']} concurrent streams, {ls['bytes_streamed'] / MiB:.1f}"
               f" MiB in {ls['duration_s']:.1f} s (MiB): before {ls['rss_before'] / MiB:.1f}, "
               f"peak {ls['rss_peak'] / MiB:.1f}, after {ls['rss_after'] / MiB:.1f}")
    errs = r["gateway_log_errors"]
    if any(errs.values()):
        out.append(f"  gateway error log lines: {errs}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer requests (about a minute)")
    ap.add_argument("--requests", type=int, help="admitted requests per target (default 5000; "
                    "--quick 1000)")
    ap.add_argument("--concurrency", type=int, help="concurrent connections (default 32)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = ap.parse_args(argv)
    p = params(args)
    return run_bounded("benchmark", lambda: bench(p), p.time_budget_s, render, args.output)


if __name__ == "__main__":
    sys.exit(main())
