"""Costs of the embedded limiter (gateway/store/gcra.py): one admission with few and with many
live entries, and the memory and time one admitted and settled request costs.

    python -m bench.limiter [--small 1000] [--large 200000] [--rounds 20000]
    python -m bench.limiter --workload [--requests 20000] [--rate 500] [--against OLD.py]

The default fills a Limiter with N live subjects (an rpm bucket and a concurrency lease each),
then times admissions of fresh subjects while the oldest entries expire around them, and
prints the cost per admission at both sizes and their ratio. The clean-up is O(log n)
amortised, so the ratio stays near 1 (before, every admission past 100k live entries rebuilt
the whole table: ≈ 9 ms each at 200k).

`--workload` admits and settles requests of the benchmark's workload (key, reseller and
customer, each with every limit; lease ids as gateway/limits.py makes them) at `--rate`
requests a second of simulated time, and prints the bytes the limiter still holds per request
(tracemalloc, after a collection) while the requests are younger than a lease ttl; the bytes
it holds in the steady state, per request/s of load (mean and largest of 8 readings over two
lease ttls, after two ttls of traffic); and the time of one admission and its settlement
(best of 5 rounds). `--against` names another copy of gcra.py (say
`git show main:gateway/store/gcra.py > /tmp/gcra_main.py`) measured in the same run, timing
rounds alternating, with the ratios this ÷ against.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import secrets
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.limits import LEASE_TTL_MS
from gateway.store.base import AdmitRequest, Settlement, Subject
from gateway.store.gcra import Limiter


def _req(i: int) -> AdmitRequest:
    return AdmitRequest((Subject("customer", f"c{i}", "r", rpm=1, concurrency=2),),
                        f"l{i}", 60_000, 0, 0)


def per_admission_us(live: int, rounds: int) -> float:
    """µs per admission with `live` subjects live (a steady state: one expires per admit)."""
    lim = Limiter()
    # Subject i is admitted at i ms, so its bucket is full (and its lease gone) after
    # 60 s (rpm 1, and the lease): spacing the fill keeps `live` entries live throughout.
    step = 60_000.0 / live
    for i in range(live):
        lim.admit(_req(i), now_ms=i * step)
    gc.disable()
    t0 = time.perf_counter()
    for j in range(rounds):
        lim.admit(_req(live + j), now_ms=(live + j) * step)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed / rounds * 1e6


# --- the benchmark's workload: admit, then settle ------------------------------------------------

_HIGH = 10**9
SUBJECTS = tuple(Subject(kind, ident, "bench", rpm=_HIGH, itpm=_HIGH, otpm=_HIGH,
                         concurrency=10_000)
                 for kind, ident in (("key", "k1"), ("reseller", "bench"), ("customer", "c1")))


def _serve(lim: Any, first: int, n: int, step_ms: float, prefix: str) -> None:
    """Admit and settle requests first .. first + n - 1, request i at i * step_ms."""
    for i in range(first, first + n):
        now = i * step_ms
        lease = f"{prefix}{i:x}"
        lim.admit(AdmitRequest(SUBJECTS, lease, LEASE_TTL_MS, 400, 1000), now_ms=now)
        lim.settle(Settlement(SUBJECTS, lease, 400, 1000, 380, 250), now_ms=now)


def _held(lim: Any, first: int, n: int, step_ms: float, prefix: str) -> int:
    """Bytes allocated by serving n requests that are still held after a collection."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    _serve(lim, first, n, step_ms, prefix)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before


def held(limiter: Callable[[], Any], requests: int, rate: float) -> dict[str, float]:
    """For one Limiter class: bytes held per request (all younger than a lease ttl), and bytes
    held in the steady state of `rate` per request/s (mean and largest of 8 readings over two
    lease ttls, after two ttls of traffic). Deterministic: measured once."""
    step = 1000.0 / rate
    prefix = secrets.token_hex(6) + ":"
    lim = limiter()
    _serve(lim, 0, 1000, step, prefix)  # buckets, heaps and the first dict sizes
    young = _held(lim, 1000, requests, step, prefix)
    quarter = int(rate * LEASE_TTL_MS / 1000 / 4)
    lim = limiter()
    gc.collect()
    tracemalloc.start()
    empty = tracemalloc.get_traced_memory()[0]
    _serve(lim, 0, 8 * quarter, step, prefix)
    readings = []
    for q in range(8, 16):
        _serve(lim, q * quarter, quarter, step, prefix)
        gc.collect()
        readings.append(tracemalloc.get_traced_memory()[0] - empty)
    tracemalloc.stop()
    return {"bytes_per_request": young / requests,
            "steady_bytes_per_rps": sum(readings) / len(readings) / rate,
            "steady_max_bytes_per_rps": max(readings) / rate}


def per_request_us(limiter: Callable[[], Any], requests: int, rate: float) -> float:
    """µs per admission and its settlement (collector paused)."""
    step = 1000.0 / rate
    prefix = secrets.token_hex(6) + ":"
    lim = limiter()
    _serve(lim, 0, 1000, step, prefix)
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    _serve(lim, 1000, requests, step, prefix)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed / requests * 1e6


def _load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("bench_gcra_against", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Limiter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=20_000)
    ap.add_argument("--workload", action="store_true",
                    help="memory and time per admitted and settled request instead")
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--rate", type=float, default=500.0, help="requests per simulated second")
    ap.add_argument("--against", type=Path, help="another gcra.py to measure in the same run")
    a = ap.parse_args()
    if not a.workload:
        small = per_admission_us(a.small, a.rounds)
        large = per_admission_us(a.large, a.rounds)
        print(f"live entries {a.small:>8}: {small:8.2f} µs per admission")
        print(f"live entries {a.large:>8}: {large:8.2f} µs per admission")
        print(f"ratio: {large / small:.2f}")
        return
    classes = {"this": Limiter}
    if a.against is not None:
        classes["against"] = _load(a.against)
    best = {name: held(cls, a.requests, a.rate) for name, cls in classes.items()}
    times: dict[str, list[float]] = {name: [] for name in classes}
    for _ in range(5):  # rounds alternate, so other load on the machine hits both alike
        for name, cls in classes.items():
            times[name].append(per_request_us(cls, a.requests, a.rate))
    for name in classes:
        best[name]["us_per_request"] = min(times[name])
    print(f"{a.requests:,} requests at {a.rate:,.0f}/s (simulated), 3 subjects with every "
          f"limit; lease ttl {LEASE_TTL_MS / 1000:.0f} s; time: best of 5 rounds")
    labels = {"bytes_per_request": "bytes held per request (younger than a ttl)",
              "steady_bytes_per_rps": "bytes held in steady state per request/s, mean",
              "steady_max_bytes_per_rps": "  the same, largest reading",
              "us_per_request": "µs per admission and settlement"}
    for k, label in labels.items():
        line = f"  {label:<48}" + "".join(f"{best[n][k]:>12,.1f} ({n})" for n in best)
        if "against" in best:
            line += f"   this ÷ against: {best['this'][k] / best['against'][k]:.2f}"
        print(line)


if __name__ == "__main__":
    main()
