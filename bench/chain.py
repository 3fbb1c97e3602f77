"""What `log.hash_chain` costs per line: the request-line writer with the chain off and on.

    python -m bench.chain [--lines 200000]

Writes the same request line N times to the null device through the gateway's request-line writer,
first with the chain off (the old path: one `json.dumps`), then on (a sorted serialisation
and one SHA-256 per line, under the chain's lock), and prints microseconds per line for each
and the difference. The chain off takes no other code path than before.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

from gateway.context import RequestContext
from gateway.hash_chain import HashChain
from gateway.request_log import _RequestWriter


def _ctx() -> RequestContext:
    ctx = RequestContext("req_895e46c410a647fa0bc6a32d", "127.0.0.1", "POST", "/v1/messages",
                         0.0)
    ctx.client_ip, ctx.country, ctx.asn, ctx.reseller = "203.0.113.35", "US", 64521, "direct"
    ctx.key_id, ctx.model, ctx.status, ctx.upstream_status = "e94a1c2b997935b3", "m", 200, 200
    ctx.duration_ms, ctx.upstream_ms, ctx.input_tokens, ctx.output_tokens = 5.1, 4.9, 25, 40
    return ctx


def _per_line_us(writer: _RequestWriter, ctx: RequestContext, n: int) -> float:
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(n):
            writer.write(ctx)
        return (time.perf_counter() - start) / n * 1e6
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=200_000)
    args = ap.parse_args()
    ctx = _ctx()
    with open(os.devnull, "w") as sink:
        off = _per_line_us(_RequestWriter(sink, "json", None, None), ctx, args.lines)
        on = _per_line_us(_RequestWriter(sink, "json", None, HashChain()), ctx, args.lines)
    print(f"request line, chain off: {off:.2f} us/line")
    print(f"request line, chain on:  {on:.2f} us/line (+{on - off:.2f} us: sorted JSON + SHA-256)")


if __name__ == "__main__":
    main()
