"""The usage ledger's per-request and per-flush work (gateway/ledger.py, docs/architecture.md
§12), with no HTTP and no Redis:

    python -m bench.ledger [--requests N] [--rounds R] [--baseline REV]

Per request: µs of the ledger calls the pipeline makes for a request under a quota on its key
and its reseller (find, use_of, hold, record, release), under a quota on its reseller only,
and for a request without quotas (record alone), over 1,000 keys of 10 resellers, all watched.
Per flush: 10,000 distinct keys with a quota each make one request and go idle: the subjects
the next flush reads (`Store.period_use`, counted by a subclass of the embedded store) and the
per-subject tallies the ledger then holds; then the same for 10,000 keys without quotas.

With `--baseline REV` the module `gateway/ledger.py` of git revision REV (before this bench's
change: strings per call, `known`/`watch(reseller, key_id)`/`used(subject)`) is loaded beside
the current one and driven the way the pipeline of REV called it, in rounds alternating with
the current one, and the ratios are printed. Absolute µs are noise on a shared machine;
compare within a run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from gateway import ledger as current
from gateway.store.base import PeriodUse, key_subject, reseller_subject
from gateway.store.memory import MemoryStore

KEYS = 1000
RESELLERS = 10
IDLE_KEYS = 10_000


class CountingStore(MemoryStore):
    """The embedded store, counting the subjects each `period_use` read. With `key_ids`, it
    takes the baseline's question ({reseller: key ids}: each reseller read beside its keys)."""

    def __init__(self, key_ids: bool = False) -> None:
        super().__init__()
        self.key_ids = key_ids
        self.last_read = 0

    async def period_use(self, subjects: Mapping[str, Collection[str]],
                         day: str) -> dict[str, PeriodUse]:
        if self.key_ids:
            subjects = {r: [reseller_subject(r), *(key_subject(k) for k in keys)]
                        for r, keys in subjects.items()}
        self.last_read = sum(len(v) for v in subjects.values())
        return await super().period_use(subjects, day)


class Clock:
    """A clock the bench moves past the idle time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _baseline(rev: str) -> ModuleType:
    """gateway/ledger.py of `rev`, loaded as its own module."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(["git", "show", f"{rev}:gateway/ledger.py"], cwd=root,
                          check=True, capture_output=True, text=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    path = folder / "ledger_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("ledger_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ledger_baseline"] = module
    spec.loader.exec_module(module)
    return module


def _ids(n: int) -> list[tuple[str, str]]:
    return [(f"r{i % RESELLERS}", f"k{i}") for i in range(n)]


# --- one request, as each version's pipeline calls the ledger ---------------------------------
Request = Callable[[str, str, float], None]


def _current_request(ledger: current.Ledger, of_key: bool, of_reseller: bool) -> Request:
    def one(reseller: str, key_id: str, now: float) -> None:
        watched = ledger.find(reseller, key_id, of_key, of_reseller)
        assert watched is not None
        current.use_of(watched, now)
        ledger.hold(watched)
        ledger.record(reseller, key_id, "c1", "claude-x", 10, 20, now)
        ledger.release(watched)
    return one


def _baseline_request(mod: ModuleType, ledger: Any) -> Request:
    key_subject, reseller_subject = mod.key_subject, mod.reseller_subject

    def one(reseller: str, key_id: str, now: float) -> None:
        if not ledger.known(reseller, key_id):
            raise AssertionError("not watched")
        ledger.used(key_subject(key_id), now)
        ledger.used(reseller_subject(reseller), now)
        ledger.hold(reseller, key_id)
        ledger.record(reseller, key_id, "c1", "claude-x", 10, 20, now)
        ledger.release(reseller, key_id)
    return one


def _record_only(ledger: Any) -> Request:
    def one(reseller: str, key_id: str, now: float) -> None:
        ledger.record(reseller, key_id, "c1", "claude-x", 10, 20, now)
    return one


def _time(one: Request, ids: list[tuple[str, str]], requests: int) -> float:
    """µs per call of `one`, cycling through `ids` (the collector paused)."""
    now = time.time()
    n = len(ids)
    gc.collect()
    gc.disable()
    t0 = time.perf_counter()
    for i in range(requests):
        r, k = ids[i % n]
        one(r, k, now)
    elapsed = time.perf_counter() - t0
    gc.enable()
    return elapsed / requests * 1e6


async def _setups(baseline: ModuleType | None) -> dict[str, dict[str, Request]]:
    """Per workload, per version: a request's calls on a ledger whose subjects are read."""
    ids = _ids(KEYS)
    out: dict[str, dict[str, Request]] = {"key and reseller quota": {},
                                          "reseller quota only": {}, "no quota": {}}
    for name, of_key, of_reseller in (("key and reseller quota", True, True),
                                      ("reseller quota only", False, True)):
        store = MemoryStore()
        ledger = current.Ledger(store, 400)
        for r, k in ids:
            await ledger.watch(r, k, of_key, of_reseller)
        out[name]["current"] = _current_request(ledger, of_key, of_reseller)
        if baseline is not None:
            old = baseline.Ledger(CountingStore(key_ids=True), 400)
            for r, k in ids:
                await old.watch(r, k)
            out[name]["baseline"] = _baseline_request(baseline, old)
    out["no quota"]["current"] = _record_only(current.Ledger(MemoryStore(), 400))
    if baseline is not None:
        out["no quota"]["baseline"] = _record_only(baseline.Ledger(MemoryStore(), 400))
    return out


async def _per_flush(baseline: ModuleType | None) -> dict[str, dict[str, int]]:
    """Subjects read by the flush after IDLE_KEYS keys with a quota each made one request and
    went idle, and the per-subject tallies kept; then for keys without quotas."""
    ids = _ids(IDLE_KEYS)
    now = time.time()
    out: dict[str, dict[str, int]] = {}
    clock = Clock()
    store = CountingStore()
    ledger = current.Ledger(store, 400, clock=clock)
    for r, k in ids:
        one = await ledger.watch(r, k, True, True)
        ledger.hold(one)
        ledger.record(r, k, None, "m", 1, 1, now)
        ledger.release(one)
    await ledger.flush()
    busy, store.last_read = store.last_read, 0
    clock.now += current.IDLE_S
    await ledger.flush()
    kept = sum(len(w.local) for w in (*ledger._keys.values(), *ledger._resellers.values()))
    plain = current.Ledger(MemoryStore(), 400)
    for r, k in ids:
        plain.record(r, k, None, "m", 1, 1, now)
    plain_kept = sum(len(w.local) for w in (*plain._keys.values(),
                                            *plain._resellers.values()))
    out["current"] = {"read_while_used": busy, "read_when_idle": store.last_read,
                      "tallies_kept": kept, "tallies_kept_no_quota": plain_kept}
    if baseline is not None:
        store = CountingStore(key_ids=True)
        old = baseline.Ledger(store, 400)
        for r, k in ids:
            await old.watch(r, k)
            old.hold(r, k)
            old.record(r, k, None, "m", 1, 1, now)
            old.release(r, k)
        await old.flush()
        busy, store.last_read = store.last_read, 0
        await old.flush()  # the baseline has no idle time: every later flush is the same
        plain_old = baseline.Ledger(MemoryStore(), 400)
        for r, k in ids:
            plain_old.record(r, k, None, "m", 1, 1, now)
        out["baseline"] = {"read_while_used": busy, "read_when_idle": store.last_read,
                           "tallies_kept": len(old._local),
                           "tallies_kept_no_quota": len(plain_old._local)}
    return out


async def main_async(requests: int, rounds: int, rev: str | None) -> None:
    baseline = _baseline(rev) if rev else None
    setups = await _setups(baseline)
    ids = _ids(KEYS)
    print(f"Usage ledger, µs per request ({requests:,} requests x {rounds} alternating rounds, "
          f"{KEYS:,} keys of {RESELLERS} resellers; median of rounds)")
    for name, versions in setups.items():
        times: dict[str, list[float]] = {v: [] for v in versions}
        for _ in range(rounds):
            for v, one in versions.items():
                times[v].append(_time(one, ids, requests))
        med = {v: statistics.median(ts) for v, ts in times.items()}
        line = f"  {name:<24} current {med['current']:6.2f} µs"
        if "baseline" in med:
            ratios = sorted(c / b for c, b in zip(times["current"], times["baseline"],
                                                   strict=True))
            line += (f"   baseline {med['baseline']:6.2f} µs   ratio "
                     f"{med['current'] / med['baseline']:.2f}x "
                     f"(rounds {ratios[0]:.2f} to {ratios[-1]:.2f})")
        print(line)
    flush = await _per_flush(baseline)
    print(f"Per flush, after {IDLE_KEYS:,} keys with a quota each made one request "
          f"(idle: {current.IDLE_S:.0f} s later):")
    for v, f in flush.items():
        print(f"  {v:<8} subjects read: {f['read_while_used']:,} while used, "
              f"{f['read_when_idle']:,} once idle; per-subject tallies kept then: "
              f"{f['tallies_kept']:,}; after {IDLE_KEYS:,} keys without quotas: "
              f"{f['tallies_kept_no_quota']:,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--baseline", metavar="REV", default=None,
                    help="git revision whose gateway/ledger.py to compare with")
    a = ap.parse_args()
    asyncio.run(main_async(a.requests, a.rounds, a.baseline))


if __name__ == "__main__":
    main()
