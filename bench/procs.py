"""Child processes of the benchmark and what /proc says about them (CPU time, RSS)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads, live and exited), from /proc/<pid>/stat;
    resolution one clock tick (usually 10 ms)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/<pid>/statm."""
    with open(f"/proc/{pid}/statm", "rb") as f:
        return int(f.read().split()[1]) * _PAGE


class Child:
    """One child process started with asyncio; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 log: IO[bytes] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        out = self.log if self.log is not None else asyncio.subprocess.DEVNULL
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=REPO, env=self.env, stdin=asyncio.subprocess.DEVNULL,
            stdout=out, stderr=out if self.log is not None else None)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_http(self, url: str, timeout: float = 20.0, method: str = "GET") -> None:
        """Wait until `url` answers anything below 500 (or the process exits)."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.request(method, url, data=b"{}" if method == "POST" else None,
                                         timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status < 500:
                            return
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if not self.alive():
                    code = self.proc.returncode if self.proc else None
                    raise RuntimeError(f"{self.name} exited with {code}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} did not answer {url} within {timeout} s")
                await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 10.0) -> None:
        p = self.proc
        if p is None or p.returncode is not None:
            return
        try:
            p.send_signal(signal.SIGTERM)
            await asyncio.wait_for(p.wait(), timeout)
        except TimeoutError:
            p.kill()
            await p.wait()
        except ProcessLookupError:
            pass


async def stop_all(children: list[Child]) -> None:
    """Stop `children` in the reverse of their start order (a proxy before what it forwards
    to) and close their logs."""
    for c in reversed(children):
        await c.stop()
        if c.log is not None:
            c.log.close()


def py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def run_bounded(name: str, work: Callable[[], Awaitable[dict[str, Any]]], budget_s: float,
                render: Callable[[dict[str, Any]], str], output: Path) -> int:
    """Run `work` on uvloop within `budget_s` (SIGTERM and Ctrl-C cancel it, so everything it
    started is stopped), print `render` of its result and write the result as JSON; the exit
    code: 0, 1 past the budget, 130 when interrupted."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass

    async def bounded() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with asyncio.timeout(budget_s):
            return await work()

    started = time.monotonic()
    try:
        result = asyncio.run(bounded())
    except TimeoutError:
        print(f"{name} aborted: over its time budget of {budget_s:.0f} s", file=sys.stderr)
        return 1
    except (asyncio.CancelledError, KeyboardInterrupt):
        print(f"{name} interrupted", file=sys.stderr)
        return 130
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(render(result))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\n(wall time {result['wall_s']} s; JSON: {output})")
    return 0
