"""The real `gateway` command for integration tests: one-shot CLI runs, the one harness of a
gateway served by a subprocess (`gateway run`, with or without `--workers`), and a plain HTTP
client call."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import IO, Any

import aiohttp
from multidict import CIMultiDictProxy

from tests.support.gateway import (
    ADMIN_TOKEN,
    REPO,
    UPSTREAM_KEY,
    issue_key_at,
    poll,
    write_config,
)
from tests.support.redis_server import free_port
from tests.support.transcript import TRANSCRIPT

#: MaxMind's own test databases, with their licence (see their README).
TEST_GEO = REPO / "tests" / "data" / "geoip"
CLI_TIMEOUT_S = 60.0


def cli_env() -> dict[str, str]:
    """The environment the CLI and a gateway subprocess need (secrets via env, as in prod)."""
    env = dict(os.environ, GATEWAY_ADMIN_TOKEN=ADMIN_TOKEN, UPSTREAM_API_KEY=UPSTREAM_KEY)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def run_cli(*args: str, config: Path | None, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run `python -m gateway <args> --config <config>` to completion (blocking: call it
    through `asyncio.to_thread` while an in-process gateway must keep serving, or use `cli`);
    `config=None` adds no --config, `env` replaces cli_env()."""
    tail = [] if config is None else ["--config", str(config)]
    done = subprocess.run(
        [sys.executable, "-m", "gateway", *args, *tail],
        env=cli_env() if env is None else env, cwd=cwd, capture_output=True, text=True,
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


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`run_cli(*args)` (no --config added) in `cwd`, off the event loop: (exit code, stdout,
    stderr)."""
    done = await asyncio.to_thread(run_cli, *args, config=None, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


class GatewayProcess:
    """`gateway run --config CONFIG ARGS` as a subprocess. Every output line is kept in `raw`
    (stdout and stderr alike); stdout's JSON lines also as dicts in `lines`, stderr also
    apart in `stderr`. stdout must hold JSON lines only: `finish` and `stop` fail naming any
    other line.

    Use it as a (sync) context manager, leaving it stops the process (`stop`), or through
    `gateway_process` (async, on free ports, ready when entered)."""

    def __init__(self, config: Path, *args: str, cwd: Path = REPO,
                 rlimit_nofile: int | None = None, port: int | None = None,
                 admin_port: int | None = None) -> None:
        self.config = config
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.raw: list[str] = []
        self.lines: list[dict[str, Any]] = []
        self.not_json: list[str] = []  # stdout lines that are no JSON object
        self._stderr: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config), *args],
            env=cli_env(), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1,
            preexec_fn=None if rlimit_nofile is None else lambda: resource.setrlimit(
                resource.RLIMIT_NOFILE, (rlimit_nofile, rlimit_nofile)),
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, True),
                                          daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stderr, False),
                                          daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], stdout: bool) -> None:
        for line in stream:
            TRANSCRIPT.output("log", line)
            line = line.rstrip("\n")
            self.raw.append(line)
            if not stdout:
                self._stderr.append(line)
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            if isinstance(doc, dict):
                self.lines.append(doc)
            else:
                self.not_json.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process has exited; None while it runs."""
        return self.proc.poll()

    @property
    def stderr(self) -> str:
        return "\n".join(self._stderr)

    def events(self, name: str) -> list[dict[str, Any]]:
        return [x for x in list(self.lines) if x.get("event") == name]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def issue_key(self, reseller: str = "direct", **spec: Any) -> tuple[str, str]:
        """(key id, key) of a key issued through this process's admin API."""
        return await issue_key_at(self.admin_url, reseller, **spec)

    async def ready(self) -> bool:
        """True once the admin listener answers /readyz with 200 (fails if the process
        exited)."""
        assert self.returncode is None, f"gateway exited early: {self.stderr}"
        try:
            async with aiohttp.ClientSession() as http, http.get(
                    self.admin_url + "/readyz") as r:
                return r.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def finish(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit (TimeoutError after `timeout`) and for its output
        to be read; its exit code."""
        def wait() -> int:
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"the gateway still runs after {timeout} s") from None
            self._close()
            return code

        return await asyncio.to_thread(wait)

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
        self._close()
        assert not leftovers, f"workers outlived their supervisor: {leftovers}"
        return code

    def _close(self) -> None:
        """After the exit: the output read to its end, the pipes closed, stdout checked."""
        for reader in self._readers:
            reader.join(timeout=10)
            if reader.is_alive():  # closing the pipe under a blocked reader would hang
                raise AssertionError("the gateway's output pipe is still held open")
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        assert not self.not_json, f"stdout lines that are no JSON object: {self.not_json[:5]}"

    def worker_pids(self) -> set[int]:
        """Every worker process the supervisor reported starting."""
        return {int(e["pid"]) for e in self.events("worker_started")}

    def __enter__(self) -> GatewayProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@asynccontextmanager
async def gateway_process(tmp: Path, upstream_url: str, policy: dict[str, Any] | None = None,
                          rlimit_nofile: int | None = None, **sections: Any
                          ) -> AsyncIterator[GatewayProcess]:
    """A `gateway run` process on free ports with a config written in `tmp` (its working
    directory), entered once ready; killed on exit. `rlimit_nofile` caps its file
    descriptors."""
    port, admin_port = free_port(), free_port()
    config = write_config(tmp, upstream_url, policy, listen=f"127.0.0.1:{port}",
                          admin_listen=f"127.0.0.1:{admin_port}", **sections)
    gw = GatewayProcess(config, cwd=tmp, rlimit_nofile=rlimit_nofile, port=port,
                        admin_port=admin_port)
    try:
        await poll(gw.ready, timeout=30, interval=0.05)
        yield gw
    finally:
        if gw.returncode is None:
            gw.proc.kill()
        with suppress(TimeoutError):
            await gw.finish()


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


#: A client address the demo geo data places in the US, as a trusted proxy forwards it.
US = {"X-Forwarded-For": "192.0.2.1"}
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
