"""Which Redis commands the gateway sent, and what for: `MONITOR`, classified.

`INFO commandstats` counts commands by name only. A request's limit scripts and the background
flushes (usage ledger, screening tallies, last-used times, sync) both send `EVALSHA`, and
their scripts run `HMGET`/`HSET` alike, so by name alone a background flush looks like work
per request. `MONITOR` shows every command with its arguments, in execution order: a client's
`EVALSHA` names its script by SHA-1, and the commands a script runs inside Redis ("lua"
lines) follow their `EVALSHA` line (scripts are atomic). That attributes each command to a
limit script on the request's connection or to the background.

MONITOR costs redis-server CPU, so bench.run watches only batches it does not time.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

#: The scripts a request calls: admission before forwarding (admit.lua also carries the
#: settlements after the answers), cancel when the upstream call fails. Every other script is
#: background work.
REQUEST_SCRIPTS = frozenset({"admit.lua", "cancel.lua"})
#: Our own probe's commands and a new connection's set-up, not the gateway's work.
IGNORED = frozenset({"info", "monitor", "echo"})
CONNECTION_SETUP = frozenset({"hello", "client", "auth", "select"})

_LINE = re.compile(r'^\+?[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"(?: "((?:[^"\\]|\\.)*)")?')


def script_names() -> dict[str, str]:
    """SHA-1 (as `EVALSHA` sends it) of each bundled script → its file name, as the store
    itself loads them (gateway.store.redis.store.lua)."""
    import gateway
    from gateway.store.redis.store import lua

    folder = Path(gateway.__file__).parent / "store" / "lua"
    return {lua(p.name).sha: p.name for p in sorted(folder.glob("*.lua"))}


@dataclass
class Classified:
    """Commands seen, by purpose. `request_calls` and `request_internal` are the limit
    scripts' `EVALSHA`s and the commands they ran; `background` is everything else the gateway
    sent (by command, a script call as `evalsha:<script>`) with what those scripts ran."""
    request_calls: Counter[str] = field(default_factory=Counter)
    request_internal: Counter[str] = field(default_factory=Counter)
    background: Counter[str] = field(default_factory=Counter)
    connection_setup: int = 0
    unattributed: int = 0

    def feed(self, line: str, names: dict[str, str], state: list[str]) -> None:
        """Count one MONITOR line; `state` holds the purpose of the last script call, which
        the script's own ("lua") lines that follow share."""
        m = _LINE.match(line)
        if m is None:
            return
        origin, cmd, first = m.group(1), m.group(2).lower(), m.group(3) or ""
        if origin == "lua":
            if not state:
                self.unattributed += 1
            elif state[0] == "request":
                self.request_internal[cmd] += 1
            else:
                self.background[cmd] += 1
            return
        if cmd in IGNORED:
            return
        if cmd in CONNECTION_SETUP:
            self.connection_setup += 1
            return
        if cmd in ("evalsha", "eval"):
            script = names.get(first, "?") if cmd == "evalsha" else "eval"
            purpose = "request" if script in REQUEST_SCRIPTS else "background"
            state[:] = [purpose]
            if purpose == "request":
                self.request_calls[script] += 1
            else:
                self.background[f"evalsha:{script}"] += 1
            return
        state.clear()
        self.background[cmd] += 1


class Monitor:
    """A MONITOR connection to a redis-server, classifying its lines while it is open."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.names = script_names()
        self.result = Classified()
        self._state: list[str] = []
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._marker = f"bench-monitor-end-{id(self)}"
        self._seen_marker = asyncio.Event()

    async def __aenter__(self) -> Classified:
        reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(b"MONITOR\r\n")
        await self._writer.drain()
        if (await reader.readline()).strip() != b"+OK":
            raise RuntimeError("redis-server refused MONITOR")
        self._task = asyncio.create_task(self._read(reader))
        return self.result

    async def _read(self, reader: asyncio.StreamReader) -> None:
        async for raw in reader:
            line = raw.decode("utf-8", "replace")
            if self._marker in line:
                self._seen_marker.set()
                continue
            self.result.feed(line, self.names, self._state)

    async def __aexit__(self, *exc: object) -> None:
        # Our own ECHO marks the end: once its line is read, so is every line before it.
        assert self._writer is not None and self._task is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"ECHO {self._marker}\r\n".encode())
        await writer.drain()
        await reader.readline()
        writer.close()
        await asyncio.wait_for(self._seen_marker.wait(), 30)
        self._task.cancel()
        self._writer.close()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
