"""`gateway run --workers 2` against `--workers 1`: requests per second and CPU per request.

    python -m bench.workers [--requests N] [--rounds R] [--concurrency C] [--no-pin]

Issue 15 asks that N workers serve >= 0.8 x N times one worker's requests per second where N
cores are free. Starts, on 127.0.0.1: a private redis-server (`--workers` above 1 needs a
shared store; gateway/workers.py refuses the embedded memory:// store, so both gateways use
Redis, for a like-for-like comparison), bench.upstream, and two gateways on the same config:
`gateway run --workers 1` and `gateway run --workers 2` (its workers share the listener
through SO_REUSEPORT). Each is driven with the same closed-loop load (non-streaming
`POST /v1/messages`, one key, C connections) in interleaved rounds, so that other load on the
machine hits both alike.

Reported per gateway: requests/s, and CPU seconds per request summed over all its processes
(the supervisor and every worker, utime + stime from /proc/<pid>/stat), with the cores each
process group kept busy (CPU seconds / wall seconds): gateway, load generator (this process),
upstream, redis-server. A second worker that gets no more done per second while CPU per
request stays flat was starved of CPU, not slowed by the gateway.

Pinning (default; `--no-pin` leaves it to the scheduler): the load generator, the upstream and
redis-server share the first CPU; the one-worker gateway gets the second CPU to itself, the
two-worker gateway the first two CPUs (on a 2-CPU machine its second worker competes with the
load generator). JSON goes to bench/results/workers.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.load import LoadResult, percentile, run_load
from bench.procs import REPO, Child, cpu_seconds, free_port, py, run_bounded, stop_all
from bench.run import BODY, Gateway, _expect, _open_log, headers, log, write_policy

RESULTS = REPO / "bench" / "results" / "workers.json"
X = "\u00d7"
#: Issue 15: N workers serve at least this times N one worker's requests per second.
SCALING_BUDGET = 0.8


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (a `--workers` supervisor and its workers), from the
    parent ids in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(b")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and its live descendants."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:  # exited between the listing and the read
            pass
    return total


def pin(pid: int, cpus: set[int], *, tree: bool) -> None:
    """Every thread of `pid` (with `tree`, and of its descendants) onto `cpus`; threads created
    later inherit it from their creator."""
    for p in process_tree(pid) if tree else [pid]:
        for tid in os.listdir(f"/proc/{p}/task"):
            try:
                os.sched_setaffinity(int(tid), cpus)
            except OSError:
                pass


@dataclass
class Subject:
    """One gateway under test, with what its rounds measured."""
    workers: int
    gateway: Gateway
    cpus: set[int] | None = None
    result: LoadResult = field(default_factory=LoadResult)
    cpu_s: float = 0.0
    rounds_rps: list[float] = field(default_factory=list)
    others_cpu_s: dict[str, float] = field(default_factory=dict)


async def drive(s: Subject, requests: int, concurrency: int,
                others: dict[str, int]) -> None:
    """One measured round against `s`; `others` (name → pid) are the processes whose CPU is
    reported beside the gateway's. Answers other than 200 are counted and shown, not fatal:
    a CPU-starved worker may time out on Redis, and that is part of what is measured."""
    h = headers(s.gateway.key)
    o0 = {k: cpu_seconds(v) for k, v in others.items()}
    c0 = tree_cpu_seconds(s.gateway.child.pid)
    res = await run_load(s.gateway.url, requests, concurrency, h, BODY)
    c1 = tree_cpu_seconds(s.gateway.child.pid)
    s.cpu_s += c1 - c0
    for k, v in others.items():
        s.others_cpu_s[k] = s.others_cpu_s.get(k, 0.0) + cpu_seconds(v) - o0[k]
    s.rounds_rps.append(res.rps)
    s.result.merge(res)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    import redis as redis_sync

    from tests.support.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-workers-"))
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN="bench-admin-" + secrets.token_hex(8),
               UPSTREAM_API_KEY="bench-upstream-" + secrets.token_hex(8))
    policy = write_policy(tmp)
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}"
    upstream = Child("upstream", py("bench.upstream", "--port", str(up_port)), env,
                     _open_log(tmp / "upstream.log"))
    redis = RedisServer()
    children: list[Child] = [upstream]
    available = sorted(os.sched_getaffinity(0))
    loadavg = os.getloadavg()
    pinned = args.pin and len(available) >= 2
    try:
        log("starting redis-server, upstream and the gateways (--workers 1 and 2)")
        await asyncio.to_thread(redis.start)
        await upstream.start()
        await upstream.wait_http(f"{upstream_url}/v1/messages", method="POST")
        subjects = [Subject(n, Gateway(f"workers-{n}", upstream_url, redis.url, policy, tmp,
                                       env, workers=n)) for n in (1, 2)]
        children += [s.gateway.child for s in subjects]
        await asyncio.gather(*(s.gateway.start() for s in subjects))
        await asyncio.gather(*(s.gateway.issue_key() for s in subjects))
        with redis_sync.Redis(port=redis.port) as r:
            redis_pid = int(r.info("server")["process_id"])
        others = {"load generator": os.getpid(), "upstream": upstream.pid,
                  "redis-server": redis_pid}
        if pinned:
            driver = {available[0]}
            for pid in others.values():
                pin(pid, driver, tree=False)
            for s, cpus in zip(subjects, ({available[1]}, set(available[:2])), strict=True):
                s.cpus = cpus
                pin(s.gateway.child.pid, cpus, tree=True)
        for s in subjects:
            _expect(await run_load(s.gateway.url, args.warmup, args.concurrency,
                                   headers(s.gateway.key), BODY), 200,
                    f"warm-up of --workers {s.workers}")
        per_round = max(1, args.requests // args.rounds)
        for r_ in range(args.rounds):
            for s in subjects:
                log(f"round {r_ + 1}/{args.rounds}: --workers {s.workers}")
                await drive(s, per_round, args.concurrency, others)
        return report_data(args, subjects, pinned, available, loadavg)
    finally:
        log("stopping everything")
        await stop_all(children)
        await asyncio.to_thread(redis.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def report_data(args: argparse.Namespace, subjects: list[Subject], pinned: bool,
                available: list[int], loadavg: tuple[float, float, float]) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for s in subjects:
        res = s.result
        wall = res.elapsed_s
        rows.append({
            "workers": s.workers, "cpus": sorted(s.cpus) if s.cpus else None,
            "requests": res.requests, "rps": round(res.rps, 1),
            "answers": {str(k): v for k, v in sorted(res.statuses.items())},
            "transport_errors": res.errors,
            "rps_by_round": [round(v, 1) for v in s.rounds_rps],
            "latency_p50_ms": round((percentile(res.latencies_s, 50) or 0) * 1000, 2),
            "latency_p99_ms": round((percentile(res.latencies_s, 99) or 0) * 1000, 2),
            "gateway_cpu_us_per_request": round(s.cpu_s / res.requests * 1e6, 1),
            "cores_busy": {"gateway": round(s.cpu_s / wall, 2),
                           **{k: round(v / wall, 2) for k, v in s.others_cpu_s.items()}},
        })
    one, two = rows
    ratio = two["rps"] / one["rps"] if one["rps"] else None
    # Rounds run back to back, so each pair saw about the same other load on the machine.
    by_round = sorted(b / a for a, b in zip(one["rps_by_round"], two["rps_by_round"],
                                            strict=True) if a)
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpus": available, "pinned": pinned,
        "params": {"requests": args.requests, "rounds": args.rounds,
                   "concurrency": args.concurrency, "warmup": args.warmup},
        "loadavg_before": loadavg,
        "gateways": rows,
        "rps_ratio": None if ratio is None else round(ratio, 3),
        "scaling": None if ratio is None else round(ratio / 2, 3),
        "rps_ratio_by_round": [round(v, 3) for v in by_round],
        "rps_ratio_median_round": round(statistics.median(by_round), 3) if by_round else None,
        "cpu_per_request_ratio": round(two["gateway_cpu_us_per_request"]
                                       / one["gateway_cpu_us_per_request"], 3),
    }


def render(r: dict[str, Any]) -> str:
    p = r["params"]
    out = [f"gateway --workers 1 vs 2 — {r['when']} — CPUs {r['cpus']}, "
           f"{'pinned' if r['pinned'] else 'not pinned'}; {p['requests']:,} requests each at "
           f"concurrency {p['concurrency']} in {p['rounds']} interleaved rounds, redis:// store",
           "",
           f"  {'workers':<9}{'CPUs':<9}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
           f"{'CPU µs/req':>12}  cores busy (CPU s / wall s) · req/s per round"]
    for g in r["gateways"]:
        busy = ", ".join(f"{k} {v:.2f}" for k, v in g["cores_busy"].items())
        cpus = ",".join(map(str, g["cpus"])) if g["cpus"] else "any"
        out.append(f"  {g['workers']:<9}{cpus:<9}{g['rps']:>8.0f}{g['latency_p50_ms']:>9.2f}"
                   f"{g['latency_p99_ms']:>9.2f}{g['gateway_cpu_us_per_request']:>12.1f}  "
                   f"{busy} · " + " ".join(f"{v:.0f}" for v in g["rps_by_round"]))
        if set(g["answers"]) != {"200"} or g["transport_errors"]:
            out.append(f"  {'':<9}answers {g['answers']}, {g['transport_errors']} transport "
                       "errors")
    verdict = "ok" if (r["scaling"] or 0) >= SCALING_BUDGET else "below"
    out += ["",
            f"  req/s, 2 workers ÷ 1 worker: {r['rps_ratio']:.2f}{X} = {r['scaling']:.2f}{X}2 "
            f"(budget ≥ {SCALING_BUDGET}{X}N where N cores are free: {verdict}); CPU per "
            f"request, 2 ÷ 1: {r['cpu_per_request_ratio']:.2f}{X}",
            "  req/s ratio of each pair of rounds (sorted): "
            + " ".join(f"{v:.2f}" for v in r["rps_ratio_by_round"])
            + f"; median {_ratio(r['rps_ratio_median_round'])}",
            "  load average before the run: "
            + " ".join(f"{v:.2f}" for v in r["loadavg_before"])]
    return "\n".join(out)


def _ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}{X}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=8000, help="requests per gateway")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent connections")
    ap.add_argument("--warmup", type=int, default=500, help="warm-up requests per gateway")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="leave CPU placement to the scheduler")
    ap.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    args = ap.parse_args(argv)
    return run_bounded("workers benchmark", lambda: bench(args), 240.0, render, args.output)


if __name__ == "__main__":
    sys.exit(main())
