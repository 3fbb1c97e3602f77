"""Redis work of the limit scripts alone (docs/architecture.md §9): commands executed and
redis-server CPU per admitted request, with three subjects (key, reseller, customer) each
limiting every dimension, C requests in flight at a time through the store as the gateway
uses it (admit, then settle).

    python -m bench.redis_cost [--requests N] [--concurrency C]

Starts its own redis-server (tests/support/redis_server.py) and prints one JSON line:
commands per request by name (INFO commandstats: those run inside scripts included) and
redis-server CPU (used_cpu_user + used_cpu_sys) per request, and of that the time spent inside
the scripts (commandstats' usec of EVALSHA). Run it on two checkouts to
compare layouts: the ratio of the CPU figures is the result, absolute numbers are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

import redis.asyncio as aioredis

from gateway.store.base import AdmitRequest, Settlement, Subject
from gateway.store.redis.store import RedisStore


async def _stats(r: aioredis.Redis) -> tuple[dict[str, int], float]:
    info = await r.info("commandstats")
    cpu = await r.info("cpu")
    calls = {k[len("cmdstat_"):]: int(v["calls"]) for k, v in info.items()
             if k.startswith("cmdstat_")}
    calls["evalsha_usec"] = int(info.get("cmdstat_evalsha", {}).get("usec", 0))
    for k, v in info.items():
        if k.startswith("cmdstat_") and k != "cmdstat_evalsha":
            calls["usec_" + k[len("cmdstat_"):]] = int(v["usec"])
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(url: str, requests: int, concurrency: int) -> dict[str, object]:
    store = RedisStore(url, f"cost{uuid.uuid4().hex[:6]}:")
    await store.start()
    r = aioredis.from_url(url)
    every = {"rpm": 10**8, "itpm": 10**10, "otpm": 10**10, "concurrency": 10**6}
    keys = [f"k{i}" for i in range(16)]
    customers = [f"c{i}" for i in range(64)]
    n = 0

    async def one(i: int) -> None:
        subjects = (Subject("key", keys[i % 16], "bench", **every),
                    Subject("reseller", "bench", "bench", **every),
                    Subject("customer", customers[i % 64], "bench", **every))
        lease = f"{uuid.uuid4().hex[:12]}"
        res = await store.admit(AdmitRequest(subjects, lease, 60_000, 40, 64))
        assert res.ok
        await store.settle(Settlement(subjects, lease, 40, 64, 12, 9))

    async def worker(start: int, count: int) -> None:
        nonlocal n
        for j in range(count):
            await one(start + j * concurrency)
            n += 1

    try:
        per = requests // concurrency
        await asyncio.gather(*(worker(w, 20) for w in range(concurrency)))  # warm-up
        c0, cpu0 = await _stats(r)
        t0 = time.perf_counter()
        n = 0
        await asyncio.gather(*(worker(w, per) for w in range(concurrency)))
        wall = time.perf_counter() - t0
        c1, cpu1 = await _stats(r)
    finally:
        await r.aclose()
        await store.close()
    script_us = (c1.pop("evalsha_usec") - c0.pop("evalsha_usec")) / n
    diff = {k: round((v - c0.get(k, 0)) / n, 3) for k, v in c1.items()
            if k != "info" and v - c0.get(k, 0) and not k.startswith("usec_")}
    usec = {k[5:]: round((v - c0.get(k, 0)) / n, 2) for k, v in c1.items()
            if k.startswith("usec_") and k != "usec_info" and v - c0.get(k, 0)}
    return {"requests": n, "concurrency": concurrency, "wall_s": round(wall, 2),
            "commands_per_request": round(sum(diff.values()), 3), "by_command": diff,
            "redis_cpu_us_per_request": round((cpu1 - cpu0) / n * 1e6, 1),
            "script_us_per_request": round(script_us, 1),
            "inner_us_per_request_by_command": usec}


def main(argv: list[str] | None = None) -> int:
    from tests.support.redis_server import RedisServer

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args(argv)
    server = RedisServer()
    server.start()
    try:
        out = asyncio.run(measure(server.url, args.requests, args.concurrency))
    finally:
        server.stop()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
