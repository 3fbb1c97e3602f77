"""Cost of one embedded-limiter admission with few and with many live entries.

    python -m bench.limiter [--small 1000] [--large 200000] [--rounds 20000]

Fills a Limiter (gateway/store/gcra.py) with N live subjects (an rpm bucket and a
concurrency lease each), then times admissions of fresh subjects while the oldest entries
expire around them, and prints the cost per admission at both sizes and their ratio. The
clean-up is O(log n) amortised, so the ratio stays near 1 (before, every admission past
100k live entries rebuilt the whole table: ≈ 9 ms each at 200k).
"""

from __future__ import annotations

import argparse
import gc
import time

from gateway.store.base import AdmitRequest, Subject
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=1000)
    ap.add_argument("--large", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=20_000)
    a = ap.parse_args()
    small = per_admission_us(a.small, a.rounds)
    large = per_admission_us(a.large, a.rounds)
    print(f"live entries {a.small:>8}: {small:8.2f} µs per admission")
    print(f"live entries {a.large:>8}: {large:8.2f} µs per admission")
    print(f"ratio: {large / small:.2f}")


if __name__ == "__main__":
    main()
