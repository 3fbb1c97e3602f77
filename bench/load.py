"""Closed-loop load generator: C aiohttp clients sharing a bounded request count."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp


@dataclass
class LoadResult:
    requests: int = 0
    elapsed_s: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    latencies_s: list[float] = field(default_factory=list)
    ttfb_s: list[float] = field(default_factory=list)
    body_bytes: int = 0

    def merge(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.elapsed_s += other.elapsed_s
        self.statuses.update(other.statuses)
        self.errors += other.errors
        self.latencies_s.extend(other.latencies_s)
        self.ttfb_s.extend(other.ttfb_s)
        self.body_bytes += other.body_bytes

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))]


#: One request of a mixed workload: URL, headers, body.
Variant = tuple[str, dict[str, str], bytes]


async def run_load(url: str, requests: int, concurrency: int, headers: dict[str, str],
                   body: bytes, *, stream: bool = False, timeout_s: float = 30.0,
                   variants: list[Variant] | None = None) -> LoadResult:
    """Send `requests` POSTs from `concurrency` keep-alive connections; with `stream`, also
    record the time to the first body byte of each answer. With `variants`, request i is
    variants[i % len(variants)] (URL, headers, body) instead of `url`, `headers`, `body`."""
    res = LoadResult()
    remaining = requests
    sent = 0
    mix = variants or [(url, headers, body)]
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     skip_auto_headers=("User-Agent",)) as session:

        async def worker() -> None:
            nonlocal remaining
            nonlocal sent
            while remaining > 0:
                remaining -= 1
                u, h, b = mix[sent % len(mix)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post(u, data=b, headers=h) as r:
                        if stream:
                            first = await r.content.readany()
                            res.ttfb_s.append(time.perf_counter() - t0)
                            n = len(first)
                            async for chunk in r.content.iter_any():
                                n += len(chunk)
                        else:
                            n = len(await r.read())
                        res.body_bytes += n
                        res.statuses[r.status] += 1
                except (aiohttp.ClientError, TimeoutError):
                    res.errors += 1
                res.latencies_s.append(time.perf_counter() - t0)
                res.requests += 1

        # No collector pauses in the load generator while it measures (it has little garbage).
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            res.elapsed_s = time.perf_counter() - start
        finally:
            gc.enable()
    return res
