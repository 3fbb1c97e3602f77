"""Why the request path reads geo records through maxminddb, not geoip2's typed reader.

    python -m bench.geo_readers [--lookups 200000]

Times one lookup per address, cycling through addresses of MaxMind's test Country database
(tests/data/geoip/), in the same process and on the same mapped file (C extension): geoip2's
`Reader.country()` (a typed Country model) against maxminddb's `Reader.get()` (the raw map the
gateway reads). Three alternating rounds of each; the best round counts. No cache in front:
this is the cost of a cache miss. Prints microseconds per lookup and the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geoip2.database
import geoip2.errors
import maxminddb

DB = Path(__file__).resolve().parents[1] / "tests" / "data" / "geoip" / "GeoIP2-Country-Test.mmdb"
ADDRESSES = ("81.2.69.160", "2.125.160.216", "89.160.20.112", "216.160.83.56", "1.2.3.4",
             "2001:218::1", "::81.2.69.160", "202.196.224.1")


def _per_lookup_us(fn: Callable[[str], Any], lookups: int) -> float:
    """Microseconds per call of `fn` over `lookups` addresses (not-found ones included)."""
    ips = [ADDRESSES[i % len(ADDRESSES)] for i in range(lookups)]
    start = time.perf_counter()
    for ip in ips:
        try:
            fn(ip)
        except geoip2.errors.AddressNotFoundError:
            pass
    return (time.perf_counter() - start) / lookups * 1e6


def measure(lookups: int) -> dict[str, float]:
    """Best-of-three microseconds per lookup for each reader, and geoip2 ÷ maxminddb."""
    raw = maxminddb.open_database(str(DB), maxminddb.MODE_MMAP_EXT)
    typed = geoip2.database.Reader(str(DB), mode=maxminddb.MODE_MMAP_EXT)
    try:
        best = {"maxminddb_get_us": float("inf"), "geoip2_country_us": float("inf")}
        for _ in range(3):
            best["maxminddb_get_us"] = min(best["maxminddb_get_us"],
                                           _per_lookup_us(raw.get, lookups))
            best["geoip2_country_us"] = min(best["geoip2_country_us"],
                                            _per_lookup_us(typed.country, lookups))
    finally:
        raw.close()
        typed.close()
    best["ratio"] = best["geoip2_country_us"] / best["maxminddb_get_us"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lookups", type=int, default=200_000)
    args = parser.parse_args()
    r = measure(args.lookups)
    print(f"maxminddb Reader.get      {r['maxminddb_get_us']:6.2f} us per lookup")
    print(f"geoip2 Reader.country     {r['geoip2_country_us']:6.2f} us per lookup")
    print(f"geoip2 / maxminddb        {r['ratio']:6.2f}x")


if __name__ == "__main__":
    main()
