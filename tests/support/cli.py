"""The real `gateway` command for integration tests: one-shot CLI runs, a gateway served by a
subprocess (`gateway run`, with or without `--workers`), and a plain HTTP client call."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy

from tests.support.gateway import ADMIN_TOKEN, REPO, UPSTREAM_KEY
from tests.support.transcript import TRANSCRIPT

#: MaxMind's own test databases, with their licence (see their README).
TEST_GEO = REPO / "tests" / "data" / "geoip"
CLI_TIMEOUT_S = 60.0


def cli_env() -> dict[str, str]:
    """The environment the CLI and a gateway subprocess need (secrets via env, as in prod)."""
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def run_cli(*args: str, config: Path | None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway <args> --config <config>` to completion (blocking: call it
    through `asyncio.to_thread` while an in-process gateway must keep serving); `config=None`
    adds no --config, `env` replaces cli_env()."""
    tail = [] if config is None else ["--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, *tail],
        env=cli_env() if env is None else env, cwd=REPO, capture_output=True, text=True,
        timeout=CLI_TIMEOUT_S, check=False,
    )
    if args[:2] in (("keys", "issue"), ("keys", "rotate")):
        # These print the new key, once, by design: it becomes a secret to look for elsewhere.
        for word in done.stdout.replace('"', " ").split():
            if word.startswith("gk_"):
                TRANSCRIPT.secret(word.strip(",}"))
    else:
        TRANSCRIPT.output("cli", done.stdout)
    TRANSCRIPT.output("cli", done.stderr)
    return done


class GatewayProcess:
    """`gateway run` as a subprocess; stdout and stderr are collected line by line, JSON lines
    also as dicts. Use as a (sync) context manager; leaving it stops the process."""

    def __init__(self, config: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config), *args],
            env=cli_env(), cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1,
        )
        self.raw: list[str] = []
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            TRANSCRIPT.output("log", line)
            self.raw.append(line.rstrip("\n"))
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                self.lines.append(doc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self, name: str) -> list[dict[str, Any]]:
        return [x for x in list(self.lines) if x.get("event") == name]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit (SIGKILL after `timeout`), return the exit code.

        Workers it reported starting that outlive it (a failed supervisor) are killed, so a
        failing test leaves no process behind."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        leftovers = [p for p in self.worker_pids() if pid_alive(p)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        self._reader.join(timeout=10)
        if self._reader.is_alive():  # closing the pipe under a blocked reader would hang
            raise AssertionError("the gateway's output pipe is still held open")
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        assert not leftovers, f"workers outlived their supervisor: {leftovers}"
        return code

    def worker_pids(self) -> set[int]:
        """Every worker process the supervisor reported starting."""
        return {int(e["pid"]) for e in self.events("worker_started")}

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def child_pids(pid: int) -> set[int]:
    """Live (non-zombie) child processes of `pid`, read from /proc."""
    out: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(entry.name))
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


MESSAGE = {"model": "claude-test-1", "max_tokens": 5,
           "messages": [{"role": "user", "content": "hi"}]}


async def send(url: str, key: str | None = None, ip: str | None = "192.0.2.1",
               path: str = "/v1/messages", body: dict[str, Any] | None = None,
               headers: dict[str, str] | None = None
               ) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """POST one request through the gateway on a fresh connection; (status, body, headers),
    the body decoded when it is JSON, else as text (a stream).

    `ip` goes into X-Forwarded-For (127.0.0.1, the test client, is a trusted proxy)."""
    h: dict[str, str] = dict(headers or {})
    if key is not None:
        h["x-api-key"] = key
    if ip is not None:
        h["X-Forwarded-For"] = ip
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as s, s.post(
        url + path, json=body if body is not None else MESSAGE, headers=h,
        timeout=aiohttp.ClientTimeout(total=30),
    ) as r:
        if "json" in r.headers.get("content-type", ""):
            return r.status, await r.json(), r.headers
        return r.status, await r.text(), r.headers


def code_of(body: Any) -> str | None:
    """error.code of a gateway error body (None for a success body)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return code if isinstance(code, str) else None
    return None
