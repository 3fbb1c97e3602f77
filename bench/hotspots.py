"""Where the gateway's CPU goes: sample `gateway run` with py-spy under the benchmark's load.

    pip install py-spy          # not a project dependency; any location on PATH will do
    python -m bench.hotspots [--store memory|redis] [--denied] [--seconds 8]

Starts the benchmark upstream and one gateway (embedded store, or a private redis-server),
drives admitted (or, with --denied, policy-denied) requests at concurrency 32 while py-spy
samples the gateway process, then prints the functions with the most samples: own time
(leaf frames; socket writes show up in aiohttp's writer frames), time by package, and the
inclusive time of the gateway's own functions. Sampling costs CPU, so run this apart from
`bench.run`, whose figures it would disturb.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.load import run_load
from bench.procs import Child, free_port, py
from bench.run import BODY, DENIED_IP, Gateway, headers, write_policy

_LINE = re.compile(r":\d+\)$")
_STRIP = (str(Path(sys.prefix) / "lib"), str(Path(__file__).resolve().parents[1]) + "/")


def _short(frame: str) -> str:
    frame = _LINE.sub(")", frame)
    for prefix in _STRIP:
        frame = frame.replace(prefix, "")
    return re.sub(r"\(python3\.\d+/(site-packages/)?", "(", frame)


def _package(frame: str) -> str:
    m = re.search(r"\(([^)]*)\)$", frame)
    path = m.group(1) if m else frame
    parts = path.split("/")
    return "/".join(parts[:2]) if parts[0] == "gateway" and len(parts) > 1 else parts[0]


def summarize(raw: Path, top: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    roots: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
        packages[_package(frames[-1])] += n
        names = [f.split(" (")[0] for f in frames]
        if "Pipeline.handle" in names:
            roots["Pipeline.handle (the request task)"] += n
        elif "Runner.run" not in names:
            roots["(stack not walked to the loop) " + frames[0]] += n
        elif names[-1] == "Runner.run":
            roots["(the event loop itself: uvloop, socket calls)"] += n
        else:
            roots[frames[names.index("Runner.run") + 1]] += n
    if not total:
        return "no samples"
    out = [f"{total} samples", "", "own time by package/module:"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in packages.most_common(15)]
    out += ["", "samples by task (what the event loop was running; coroutines run as tasks of "
            "their own, such as aiohttp's request-body writer, settlements or, on Python 3.11, "
            "asyncio.wait_for, show apart from the request task):"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in roots.most_common(10)]
    out += ["", f"own time, top {top} functions:"]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top)]
    out += ["", f"inclusive time of the gateway's functions, top {top}:"]
    mine = [(k, v) for k, v in inclusive.most_common() if "(gateway/" in k
            and not k.startswith(("<module>", "main ", "cmd_run", "_run_one"))]
    out += [f"  {100 * v / total:5.1f}%  {k}" for k, v in mine[:top]]
    return "\n".join(out)


async def profile(args: argparse.Namespace, spy: str) -> str:
    from tests.support.redis_server import RedisServer

    tmp = Path(tempfile.mkdtemp(prefix="gateway-hotspots-"))
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN="bench-admin-" + secrets.token_hex(8),
               UPSTREAM_API_KEY="bench-upstream-" + secrets.token_hex(8))
    port = free_port()
    upstream = Child("upstream", py("bench.upstream", "--port", str(port)), env)
    redis = RedisServer() if args.store == "redis" else None
    gw: Gateway | None = None
    raw = tmp / "pyspy.txt"
    try:
        await upstream.start()
        await upstream.wait_http(f"http://127.0.0.1:{port}/v1/messages", method="POST")
        if redis is not None:
            await asyncio.to_thread(redis.start)
        gw = Gateway("gateway", f"http://127.0.0.1:{port}",
                     redis.url if redis else "memory://", write_policy(tmp), tmp, env)
        await gw.start()
        await gw.issue_key()
        h = headers(gw.key, DENIED_IP if args.denied else "192.0.2.1")
        await run_load(gw.url, 500, args.concurrency, h, BODY)
        sampler = await asyncio.create_subprocess_exec(
            spy, "record", "-p", str(gw.child.pid), "-r", str(args.rate), "-d",
            str(args.seconds), "--format", "raw", "-o", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while loop.time() - start < args.seconds and sampler.returncode is None:
            res = await run_load(gw.url, 500, args.concurrency, h, BODY)
            sent += res.requests
        await asyncio.wait_for(sampler.wait(), args.seconds + 30)
        if sampler.returncode or not raw.exists():
            raise SystemExit(f"py-spy failed (exit {sampler.returncode}); it needs ptrace "
                             "rights over the gateway process")
        what = "policy-denied" if args.denied else "admitted"
        return (f"gateway on {args.store}://, {sent} {what} requests at concurrency "
                f"{args.concurrency}, py-spy at {args.rate} Hz for {args.seconds} s\n\n"
                + summarize(raw, args.top))
    finally:
        if gw is not None:
            await gw.child.stop()
            if gw.child.log is not None:
                gw.child.log.close()
        await upstream.stop()
        if redis is not None:
            await asyncio.to_thread(redis.stop)
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=("memory", "redis"), default="memory")
    ap.add_argument("--denied", action="store_true", help="policy-denied requests (403)")
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--py-spy", default=shutil.which("py-spy"), help="path of py-spy")
    args = ap.parse_args(argv)
    if not args.py_spy:
        print("py-spy not found: pip install py-spy (or pass --py-spy PATH)", file=sys.stderr)
        return 2
    print(asyncio.run(profile(args, args.py_spy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
