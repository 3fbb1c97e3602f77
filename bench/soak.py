"""The load run of issue 10 (a benchmark, not a test): `gateway run` under streams, short
requests and large bodies, with its memory measured from /proc.

    python -m bench.soak [--quick]

Starts, each in its own process on 127.0.0.1: the benchmark upstream (bench.upstream) and two
`gateway run` processes on the embedded store: one with the default
`server.max_inflight_body_bytes` (256 MiB), one with it lowered to 64 MiB. Then, with raw
aiohttp clients in this process, against the first gateway:

1. 1,000 streams open at once (each 20 events 400 ms apart, about 8 s);
2. 10,000 short non-streaming requests at concurrency 32;
3. 50 request bodies of 30 MB (valid Anthropic JSON, one big message), 8 at a time;
4. the 1,000 streams again (RSS that grows again would be a leak, not a high-water mark);
5. idle until its pooled upstream connections close (not with --quick);

and against the second: the same 50 bodies, 10 at a time, which the lowered bound must refuse
in part (503 gateway_overloaded) rather than hold.

The gateway's RSS (VmRSS in /proc/<pid>/status) is taken at its baseline (after a warm-up),
sampled every 100 ms through each phase for the peak (and VmHWM, reset per phase through
/proc/<pid>/clear_refs where the kernel allows it), and polled after each phase until it
settles (bounded). Results: ratios to the baseline, answers by status and error code,
transport errors, wall times; JSON in bench/results/soak.json. Bounded in count and time
(aborted past 210 s); everything started is stopped at the end, after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.load import percentile, run_load
from bench.procs import REPO, Child, free_port, py, run_bounded, stop_all
from bench.run import BODY, STREAM_BODY, Gateway, _open_log, headers, log, write_policy

RESULTS = REPO / "bench" / "results" / "soak.json"
MiB = 1024 * 1024
#: "Memory back near its baseline" (issue 10): RSS after a phase within 10 % of the baseline.
BACK_WITHIN = 1.10
DEFAULT_INFLIGHT = 256 * MiB
BOUNDED_INFLIGHT = 64 * MiB
X = "\u00d7"  # multiplication sign


@dataclass
class Params:
    streams: int = 1000
    stream_events: int = 20
    stream_delay_ms: float = 400.0
    stream_ramp_batch: int = 100        # streams opened per 50 ms while ramping up
    short: int = 10_000
    short_concurrency: int = 32
    bodies: int = 50
    body_bytes: int = 30_000_000
    body_concurrency: int = 8           # 8 x 30 MB fit in the default 256 MiB bound
    bounded_concurrency: int = 10       # 10 x 30 MB do not fit in 64 MiB
    settle_timeout_s: float = 20.0
    idle_phase: bool = True             # wait for the pooled upstream connections to close
    time_budget_s: float = 210.0


def quick() -> Params:
    return Params(streams=300, stream_events=10, stream_delay_ms=300.0, short=2000,
                  bodies=12, settle_timeout_s=10.0, idle_phase=False, time_budget_s=90.0)


# --- memory of a process ------------------------------------------------------------------------

def vm(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process in bytes, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_hwm(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux: `5` to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


class Sampler:
    """RSS every 100 ms while a phase runs (and the gateway's in-flight requests every 500 ms)."""

    def __init__(self, pid: int, admin_url: str) -> None:
        self.pid = pid
        self.admin_url = admin_url
        self.peak = 0
        self.hwm_reset = False
        self.max_inflight = 0.0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Sampler:
        self.hwm_reset = reset_hwm(self.pid)
        self.peak = vm(self.pid)["VmRSS"]
        self._tasks = [asyncio.create_task(self._rss()), asyncio.create_task(self._inflight())]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        v = vm(self.pid)
        self.peak = max(self.peak, v["VmRSS"], v["VmHWM"] if self.hwm_reset else 0)

    async def _rss(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, vm(self.pid)["VmRSS"])
            await asyncio.sleep(0.1)

    async def _inflight(self) -> None:
        async with aiohttp.ClientSession() as s:
            while not self._stop.is_set():
                try:
                    async with s.get(f"{self.admin_url}/metrics",
                                     timeout=aiohttp.ClientTimeout(total=2)) as r:
                        m = re.search(r"^gateway_inflight_requests\s+(\S+)$", await r.text(),
                                      re.M)
                    if m:
                        self.max_inflight = max(self.max_inflight, float(m.group(1)))
                except (aiohttp.ClientError, TimeoutError):
                    pass
                try:
                    await asyncio.wait_for(self._stop.wait(), 0.5)
                except TimeoutError:
                    pass


async def settle(pid: int, baseline: int, timeout_s: float) -> tuple[int, float]:
    """Poll RSS every 250 ms until it is within 2 % of the baseline or has not moved by more
    than 1 % for 3 s, at most `timeout_s`. Returns (RSS, seconds waited)."""
    t0 = time.monotonic()
    window: list[int] = []
    while True:
        rss = vm(pid)["VmRSS"]
        window = [*window[-11:], rss]
        waited = time.monotonic() - t0
        if rss <= baseline * 1.02 or waited >= timeout_s:
            return rss, waited
        if len(window) == 12 and max(window) - min(window) <= 0.01 * (baseline or rss):
            return rss, waited
        await asyncio.sleep(0.25)


# --- one phase ------------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    requests: int = 0
    wall_s: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)   # "200", "503 gateway_overloaded"
    transport_errors: Counter[str] = field(default_factory=Counter)
    incomplete: int = 0              # a 200 stream without its end, or a body not all received
    max_open: int = 0                # streams open at once, as the clients saw it
    rss_before: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    settle_s: float = 0.0
    fds_after: int = 0               # open file descriptors of the gateway after the phase
    gateway_max_inflight: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, baseline: int) -> dict[str, Any]:
        return {
            "name": self.name, "requests": self.requests, "wall_s": round(self.wall_s, 2),
            "statuses": dict(self.statuses), "transport_errors": dict(self.transport_errors),
            "incomplete": self.incomplete, "max_open": self.max_open,
            "gateway_max_inflight": self.gateway_max_inflight,
            "rss_mib": {"before": round(self.rss_before / MiB, 1),
                        "peak": round(self.rss_peak / MiB, 1),
                        "after": round(self.rss_after / MiB, 1)},
            "peak_ratio": round(self.rss_peak / baseline, 3),
            "after_ratio": round(self.rss_after / baseline, 3),
            "back_within_10pct": self.rss_after <= baseline * BACK_WITHIN,
            "settle_s": round(self.settle_s, 1), "fds_after": self.fds_after, **self.extra,
        }


async def _status(r: aiohttp.ClientResponse, body: bytes) -> str:
    if r.status < 400:
        return str(r.status)
    try:
        code = json.loads(body)["error"].get("code") or json.loads(body)["error"]["type"]
    except (ValueError, KeyError, TypeError, AttributeError):
        code = "?"
    return f"{r.status} {code}"


async def run_phase(name: str, gw: Gateway, baseline: int, p: Params,
                    work: Any) -> Phase:
    """Run `work(phase)` under the sampler, then let RSS settle."""
    ph = Phase(name)
    pid = gw.child.pid
    ph.rss_before = vm(pid)["VmRSS"]
    log(f"{name} (RSS {ph.rss_before / MiB:.1f} MiB)")
    t0 = time.perf_counter()
    async with Sampler(pid, gw.admin_url) as s:
        await work(ph)
    ph.wall_s = time.perf_counter() - t0
    ph.rss_peak, ph.gateway_max_inflight = s.peak, s.max_inflight
    ph.rss_after, ph.settle_s = await settle(pid, baseline, p.settle_timeout_s)
    ph.fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    log(f"{name}: {ph.wall_s:.1f} s, {dict(ph.statuses)}, transport errors "
        f"{dict(ph.transport_errors)}; RSS peak {ph.rss_peak / MiB:.1f}, after "
        f"{ph.rss_after / MiB:.1f} MiB")
    return ph


def streams_work(gw: Gateway, p: Params) -> Any:
    h = dict(headers(gw.key), **{"x-bench-events": str(p.stream_events),
                                 "x-bench-delay-ms": str(p.stream_delay_ms)})

    async def work(ph: Phase) -> None:
        open_now = 0
        ttfb: list[float] = []
        connector = aiohttp.TCPConnector(limit=p.streams, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=60 + p.stream_events * p.stream_delay_ms / 1000)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def one() -> None:
                nonlocal open_now
                t0 = time.perf_counter()
                try:
                    async with session.post(gw.url, data=STREAM_BODY, headers=h) as r:
                        if r.status != 200:
                            ph.statuses[await _status(r, await r.read())] += 1
                            return
                        open_now += 1
                        ph.max_open = max(ph.max_open, open_now)
                        try:
                            first = await r.content.readany()
                            ttfb.append(time.perf_counter() - t0)
                            tail = first[-64:]
                            async for chunk in r.content.iter_any():
                                tail = (tail + chunk)[-64:]
                        finally:
                            open_now -= 1
                        ph.statuses["200"] += 1
                        if b"message_stop" not in tail:
                            ph.incomplete += 1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    ph.transport_errors[type(exc).__name__] += 1
                finally:
                    ph.requests += 1

            tasks: list[asyncio.Task[None]] = []
            for i in range(0, p.streams, p.stream_ramp_batch):
                tasks += [asyncio.create_task(one())
                          for _ in range(min(p.stream_ramp_batch, p.streams - i))]
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks)
        ph.extra["ttfb_p50_ms"] = round((percentile(ttfb, 50) or 0) * 1000, 1)
        ph.extra["ttfb_p99_ms"] = round((percentile(ttfb, 99) or 0) * 1000, 1)
        ph.extra["stream_s"] = p.stream_events * p.stream_delay_ms / 1000
    return work


def short_work(gw: Gateway, p: Params) -> Any:
    async def work(ph: Phase) -> None:
        res = await run_load(gw.url, p.short, p.short_concurrency, headers(gw.key), BODY)
        ph.requests = res.requests
        ph.statuses.update({str(k): v for k, v in res.statuses.items()})
        if res.errors:
            ph.transport_errors["ClientError"] += res.errors
        ph.extra["rps"] = round(res.rps, 0)
        ph.extra["latency_p99_ms"] = round((percentile(res.latencies_s, 99) or 0) * 1000, 1)
    return work


def big_body(size: int) -> bytes:
    """A valid Anthropic Messages request of exactly `size` bytes: one long user message."""
    head = b'{"model":"claude-bench-1","max_tokens":16,"messages":[{"role":"user","content":"'
    tail = b'"}]}'
    pad = size - len(head) - len(tail)
    word = b"lorem ipsum dolor sit amet "
    text = (word * (pad // len(word) + 1))[:pad]
    data = head + text + tail
    json.loads(data)  # valid JSON, or the run is wrong
    return data


def bodies_work(gw: Gateway, p: Params, body: bytes, concurrency: int, bound: int) -> Any:
    async def work(ph: Phase) -> None:
        remaining = p.bodies
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=concurrency)
        h = headers(gw.key)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def worker() -> None:
                nonlocal remaining
                while remaining > 0:
                    remaining -= 1
                    try:
                        async with session.post(gw.url, data=body, headers=h) as r:
                            data = await r.read()
                            ph.statuses[await _status(r, data)] += 1
                            if r.status == 200 and r.headers.get("x-bench-received") != str(
                                    len(body)):
                                ph.incomplete += 1
                            at_upstream = int(r.headers.get("x-bench-draining", "0"))
                            most = max(ph.extra.get("upstream_bodies_at_once", 0), at_upstream)
                            ph.extra["upstream_bodies_at_once"] = most
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        ph.transport_errors[type(exc).__name__] += 1
                    ph.requests += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
            # Whatever the phase refused or cut, the budget must be whole again: one body alone
            # is admitted.
            async with session.post(gw.url, data=body, headers=h) as r:
                ph.extra["one_body_after"] = await _status(r, await r.read())
        ph.extra["body_mb"] = len(body) / 1e6
        ph.extra["concurrency"] = concurrency
        ph.extra["max_inflight_body_bytes"] = bound
    return work


async def pool_idle(gw: Gateway, baseline: int, fds0: int, p: Params) -> Phase:
    """No traffic until the gateway's idle upstream connections (kept alive 60 s in its pool)
    have closed, at most 80 s; then let RSS settle."""
    ph = Phase("idle until the gateway's pooled upstream connections close")
    pid = gw.child.pid
    ph.rss_before = ph.rss_peak = vm(pid)["VmRSS"]
    log(f"{ph.name} ({len(os.listdir(f'/proc/{pid}/fd'))} fds open, {fds0} at baseline)")
    t0 = time.perf_counter()
    while (len(os.listdir(f"/proc/{pid}/fd")) > fds0 + 10
           and time.perf_counter() - t0 < 80):
        ph.rss_peak = max(ph.rss_peak, vm(pid)["VmRSS"])
        await asyncio.sleep(1.0)
    ph.wall_s = time.perf_counter() - t0
    ph.rss_after, ph.settle_s = await settle(pid, baseline, p.settle_timeout_s)
    ph.fds_after = len(os.listdir(f"/proc/{pid}/fd"))
    log(f"{ph.name}: {ph.wall_s:.0f} s; RSS after {ph.rss_after / MiB:.1f} MiB")
    return ph


# --- the run ------------------------------------------------------------------------------------

async def warm_up(gw: Gateway, p: Params) -> int:
    """Exercise every path once (short requests, streams, a few 1 MB bodies), then let RSS
    settle: that is the baseline."""
    res = await run_load(gw.url, 500, 32, headers(gw.key), BODY)
    h = dict(headers(gw.key), **{"x-bench-events": "5", "x-bench-delay-ms": "10"})
    res2 = await run_load(gw.url, 100, 50, h, STREAM_BODY, stream=True)
    res3 = await run_load(gw.url, 8, 4, headers(gw.key), big_body(1_000_000))
    bad = [r.statuses for r in (res, res2, res3) if set(r.statuses) != {200} or r.errors]
    if bad:
        raise RuntimeError(f"warm-up of {gw.name} failed: {bad}")
    pid = gw.child.pid
    rss, _ = await settle(pid, 0, 5.0)  # until it stops moving (5 s at most)
    return rss


async def soak(p: Params, gateway_env: dict[str, str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN="bench-admin-" + secrets.token_hex(8),
               UPSTREAM_API_KEY="bench-upstream-" + secrets.token_hex(8))
    policy = write_policy(tmp)
    genv = dict(env, **gateway_env)
    up_port = free_port()
    upstream = Child("upstream", py("bench.upstream", "--port", str(up_port)), env,
                     _open_log(tmp / "upstream.log"))
    upstream_url = f"http://127.0.0.1:{up_port}"
    children: list[Child] = [upstream]
    ok = False
    try:
        log("starting the upstream and two gateways (memory://)")
        await upstream.start()
        await upstream.wait_http(f"{upstream_url}/v1/messages", method="POST")
        gw = Gateway("gw-default", upstream_url, "memory://", policy, tmp, genv)
        gb = Gateway("gw-bounded", upstream_url, "memory://", policy, tmp, genv)
        gb.child.argv += ["--set", f"server.max_inflight_body_bytes={BOUNDED_INFLIGHT}"]
        children += [gw.child, gb.child]
        await asyncio.gather(gw.start(), gb.start())
        await asyncio.gather(gw.issue_key(), gb.issue_key())
        body = big_body(p.body_bytes)

        baseline = await warm_up(gw, p)
        fds0 = len(os.listdir(f"/proc/{gw.child.pid}/fd"))
        log(f"{gw.name}: baseline RSS {baseline / MiB:.1f} MiB, {fds0} fds open")
        phases = [
            await run_phase(f"{p.streams:,} concurrent streams", gw, baseline, p,
                            streams_work(gw, p)),
            await run_phase(f"{p.short:,} short requests", gw, baseline, p, short_work(gw, p)),
            await run_phase(f"{p.bodies} bodies of {p.body_bytes / 1e6:g} MB, "
                            f"{p.body_concurrency} at a time", gw, baseline, p,
                            bodies_work(gw, p, body, p.body_concurrency, DEFAULT_INFLIGHT)),
            # The same streams again: RSS that stays where the first round left it is the
            # allocator's high-water mark; RSS that grows again is a leak.
            await run_phase(f"{p.streams:,} concurrent streams, again", gw, baseline, p,
                            streams_work(gw, p)),
        ]
        b_baseline = await warm_up(gb, p)
        log(f"{gb.name}: baseline RSS {b_baseline / MiB:.1f} MiB")
        bounded = await run_phase(
            f"{p.bodies} bodies of {p.body_bytes / 1e6:g} MB, {p.bounded_concurrency} at a "
            f"time, max_inflight_body_bytes {BOUNDED_INFLIGHT // MiB} MiB", gb, b_baseline, p,
            bodies_work(gb, p, body, p.bounded_concurrency, BOUNDED_INFLIGHT))
        if p.idle_phase:
            phases.append(await pool_idle(gw, baseline, fds0, p))
        ok = True
        return {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cpus": os.cpu_count(),
            "params": p.__dict__,
            "gateway_env": gateway_env,
            "hwm_reset": reset_hwm(gw.child.pid),
            "gw_default": {"baseline_mib": round(baseline / MiB, 1), "baseline_fds": fds0,
                           "max_inflight_body_bytes": DEFAULT_INFLIGHT,
                           "phases": [ph.summary(baseline) for ph in phases],
                           "log_error_lines": gw.log_errors(), "alive": gw.child.alive()},
            "gw_bounded": {"baseline_mib": round(b_baseline / MiB, 1),
                           "max_inflight_body_bytes": BOUNDED_INFLIGHT,
                           "phases": [bounded.summary(b_baseline)],
                           "log_error_lines": gb.log_errors(), "alive": gb.child.alive()},
        }
    finally:
        log("stopping everything")
        await stop_all(children)
        if not ok:
            for f in sorted(tmp.glob("*.log")):
                tail = f.read_bytes()[-1500:].decode(errors="replace")
                print(f"--- last lines of {f.name}:\n{tail}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


#: Answers that are limit refusals, not errors (issue 10: "no errors beyond limit refusals").
REFUSALS = frozenset({"429", "503 gateway_overloaded", "413 request_too_large"})


def render(r: dict[str, Any]) -> str:
    out = [f"Gateway load run — {r['when']} — {r['cpus']} CPUs; RSS ratios are to the "
           "process's baseline after warm-up (VmRSS)"
           + (f"; gateway environment {r['gateway_env']}" if r["gateway_env"] else ""), ""]
    out.append(f"  {'phase':<66}{'wall s':>7}{'peak':>8}{'after':>8}  answers / errors")
    for key in ("gw_default", "gw_bounded"):
        g = r[key]
        out.append(f"  gateway {key[3:]}: max_inflight_body_bytes "
                   f"{g['max_inflight_body_bytes'] // MiB} MiB, baseline {g['baseline_mib']} MiB"
                   f", error log lines {g['log_error_lines']}, alive {g['alive']}")
        for ph in g["phases"]:
            errs = dict(ph["transport_errors"])
            if ph["incomplete"]:
                errs["incomplete"] = ph["incomplete"]
            out.append(f"    {ph['name']:<64}{ph['wall_s']:>7.1f}{ph['peak_ratio']:>7.2f}{X}"
                       f"{ph['after_ratio']:>7.2f}{X}  {ph['statuses']}"
                       + (f" transport: {errs}" if errs else ""))
            detail = [f"RSS {ph['rss_mib']['before']} → peak {ph['rss_mib']['peak']} → "
                      f"after {ph['rss_mib']['after']} MiB (settled in {ph['settle_s']} s), "
                      f"{ph['fds_after']} fds open"]
            if ph["max_open"]:
                detail.append(f"{ph['max_open']} open at once (client), gateway in flight "
                              f"≤ {ph['gateway_max_inflight']:g}; TTFB p50 {ph['ttfb_p50_ms']}"
                              f" / p99 {ph['ttfb_p99_ms']} ms")
            if "body_mb" in ph:
                grown = (ph["rss_mib"]["peak"] - ph["rss_mib"]["before"]) * MiB
                detail.append(f"peak growth {grown / MiB:.0f} MiB = "
                              f"{grown / ph['max_inflight_body_bytes']:.2f}{X} the bound; "
                              f"up to {ph.get('upstream_bodies_at_once', 0)} bodies arriving "
                              f"at the upstream at once; one body alone afterwards: "
                              f"{ph['one_body_after']}")
            if "rps" in ph:
                detail.append(f"{ph['rps']:g} req/s, p99 {ph['latency_p99_ms']} ms")
            out.append("      " + "; ".join(detail))
    out.append("")
    verdicts = []
    for key in ("gw_default", "gw_bounded"):
        for ph in r[key]["phases"]:
            other = {s: n for s, n in ph["statuses"].items() if s != "200" and s not in REFUSALS}
            clean = not other and not ph["transport_errors"] and not ph["incomplete"]
            verdicts.append(
                f"  {'ok ' if clean else 'ERR'}"
                f" errors beyond limit refusals: {other or 'none'}, transport "
                f"{ph['transport_errors'] or 'none'}, incomplete {ph['incomplete']} — "
                f"{ph['name']}")
            verdicts.append(
                f"  {'ok ' if ph['back_within_10pct'] else 'OVER'} memory back within 10 % "
                f"of baseline: {ph['after_ratio']:.2f}{X} — {ph['name']}")
    return "\n".join(out + verdicts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller counts (about a minute)")
    ap.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    ap.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the gateways (e.g. MALLOC_TRIM_THRESHOLD_=131072)")
    args = ap.parse_args(argv)
    p = quick() if args.quick else Params()
    gateway_env = dict(a.split("=", 1) for a in args.gateway_env)
    return run_bounded("load run", lambda: soak(p, gateway_env), p.time_budget_s, render,
                       args.output)


if __name__ == "__main__":
    sys.exit(main())
