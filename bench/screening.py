"""The event-loop time of judging one reseller's screening window (docs/architecture.md §15):
the old path (a full read of the window, then compute_signals) against the judgement as
`ScreeningTallies.judge` now makes it (closed hours kept, only the open ones read), in steady
state, in one run.

    python -m bench.screening [--rounds N] [--windows 24h,7d] [--stores memory,redis]

One reseller with every hour of the window full: four pair sets of SCREENING_SET_CAP members
each, 4096 customer ids, a few dozen counters (the current hour too, so the open hours read
are as big as they get). On the embedded store and on a private redis-server
(tests/support/redis_server.py). Loop time is this thread's CPU time (`time.thread_time`)
over one judgement: nothing else runs in the loop meanwhile. Best of N rounds each; on Redis
also redis-server's CPU per judgement (INFO cpu, averaged over the rounds). Also the loop
time of the first judgement (the closed hours read, one hour per read) and the resident
memory it added (what the instance keeps). Prints one JSON line per store and window.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

from bench.procs import rss_bytes
from gateway.policy import CompiledPolicy, compile_policy, validate_policy
from gateway.screening import ScreeningTallies, compute_signals
from gateway.screening_hours import SEP
from gateway.store.base import SCREENING_SET_CAP, ScreeningTally, Store
from gateway.store.memory import MemoryStore
from gateway.store.redis.store import RedisStore

REPO = Path(__file__).resolve().parents[1]
RESELLER = "acme"


def _policy(window: str) -> CompiledPolicy:
    doc = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())
    doc["screening"] = {"window": window}
    return compile_policy(validate_policy(doc, "bench"), 1)


def _hour(rng: random.Random, hour: int) -> ScreeningTally:
    """One full hour: pools overlap from hour to hour, as returning customers do."""
    t = ScreeningTally()
    for name, n in (("req", 90_000), ("att", 80_000), ("den", 900), ("rst", 40),
                    ("anon", 800), ("inv", 30), ("lt", 70_000), ("off", 9_000)):
        t.count(name, n)
    for i in range(24):
        t.count(f"h:{i}", 100 + i)
        t.count(f"cc:C{i}", 1000 + i)
        t.count(f"asn:{64500 + i}", 2000 + i)
    t.customers.update(f"cust-{hour % 7}-{i}" for i in range(SCREENING_SET_CAP))
    pools = {"cc": (20_000, 12), "ip": (30_000, 20_000), "kc": (400, 40), "ka": (400, 300)}
    for kind, (a, b) in pools.items():
        members = t.pairs.setdefault(kind, set())
        while len(members) < SCREENING_SET_CAP:
            members.add(f"{kind}-{rng.randrange(a)}{SEP}{rng.randrange(b)}")
    t.names.update({str(64500 + i): f"Network {i}" for i in range(24)})
    return t


async def _fill(store: Store, hours: int) -> None:
    rng = random.Random(7)
    current = int(time.time() // 3600)
    for hour in range(current - hours + 1, current + 1):
        await store.add_screening({(RESELLER, hour): _hour(rng, hour)}, hours)


async def _old(store: Store, policy: CompiledPolicy) -> None:
    """A judgement as it was: the whole window read, then the signals computed."""
    hours = policy.doc.screening_or_default.window_hours
    current = int(time.time() // 3600)
    w = await store.screening_window([RESELLER], current - hours + 1, current)
    compute_signals(w[RESELLER], current, hours, policy.doc.screening_or_default)


async def _redis_cpu(client: aioredis.Redis | None) -> float:
    if client is None:
        return 0.0
    cpu = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(store: Store, window: str, rounds: int,
                  redis_url: str | None) -> dict[str, Any]:
    policy = _policy(window)
    hours = policy.doc.screening_or_default.window_hours
    await _fill(store, hours)
    ticks = itertools.count(step=10_000)  # pacing never holds a judgement back here
    tallies = ScreeningTallies(store, lambda: policy, clock=lambda: float(next(ticks)))
    rss, t0 = rss_bytes(os.getpid()), time.thread_time()
    steps, longest = 0, 0.0
    while steps == 0 or RESELLER in tallies._owed:  # the closed hours built, a step a judgement
        t1 = time.thread_time()
        await tallies.judge(policy, {RESELLER})
        steps, longest = steps + 1, max(longest, time.thread_time() - t1)
    out: dict[str, Any] = {"window": window, "hours": hours,
                           "first_loop_ms": round((time.thread_time() - t0) * 1000, 1),
                           "build_steps": steps,
                           "longest_step_ms": round(longest * 1000, 1),
                           "kept_mib": round((rss_bytes(os.getpid()) - rss) / 2**20, 1),
                           "kept_pairs": tallies._kept.get(RESELLER, 0)}
    client = aioredis.from_url(redis_url) if redis_url else None
    try:
        for name, judge in (("old", lambda: _old(store, policy)),
                            ("new", lambda: tallies.judge(policy, {RESELLER}))):
            best = float("inf")
            cpu0 = await _redis_cpu(client)
            for _ in range(rounds):
                t0 = time.thread_time()
                await judge()
                best = min(best, time.thread_time() - t0)
            out[f"{name}_loop_ms"] = round(best * 1000, 2)
            if client is not None:
                out[f"{name}_redis_cpu_ms"] = round(
                    (await _redis_cpu(client) - cpu0) / rounds * 1000, 2)
    finally:
        if client is not None:
            await client.aclose()
    out["old_over_new"] = round(out["old_loop_ms"] / max(out["new_loop_ms"], 1e-3), 1)
    return out


async def _run(kind: str, window: str, rounds: int, url: str | None) -> dict[str, Any]:
    # A full 7 d read takes longer than the store's default 1 s timeout: the old path failed
    # there with StoreError. Given time, its cost can be measured.
    store: Store = (MemoryStore() if url is None
                    else RedisStore(url, f"bs{uuid.uuid4().hex[:6]}:", timeout_s=60.0))
    await store.start()
    try:
        return {"store": kind, **await measure(store, window, rounds, url)}
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    from tests.support.redis_server import RedisServer

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--windows", default="24h,7d")
    ap.add_argument("--stores", default="memory,redis")
    args = ap.parse_args(argv)
    server = None
    try:
        for kind in args.stores.split(","):
            url = None
            if kind == "redis":
                if server is None:
                    server = RedisServer()
                    server.start()
                url = server.url
            for window in args.windows.split(","):
                print(json.dumps(asyncio.run(_run(kind, window, args.rounds, url))),
                      flush=True)
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
