"""`gateway run --workers N`: N processes sharing the listeners (SO_REUSEPORT), each with its
own uvloop event loop, supervised: a worker that dies is restarted; SIGTERM drains all."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from gateway.log import logger
from gateway.request_log import configure_logging
from gateway.settings import ConfigError, load_settings

WORKER_ENV = "GATEWAY_WORKER_ID"
WORKERS_ENV = "GATEWAY_WORKERS"


def worker_count(environ: Mapping[str, str] | None = None) -> int:
    """How many worker processes share this instance's listeners (1 unless started by
    `supervise`): each runs its own fallback limiter, so `on_error: open` divides by it."""
    value = (os.environ if environ is None else environ).get(WORKERS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def supervise(config_path: str, overrides: list[str], n: int) -> int:
    config = load_settings(config_path, overrides)
    s = config.settings
    if s.store.url.startswith("memory://"):
        raise ConfigError(config.path, "store.url",
                          "--workers > 1 needs a shared store (redis://...); the embedded "
                          "memory:// store lives in one process")
    configure_logging(s.log.level, s.log.format, s.log.hash_chain)
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=metrics_dir, **{WORKERS_ENV: str(n)})
    cmd = [sys.executable, "-m", "gateway", "run", "--config", config_path]
    for o in overrides:
        cmd += ["--set", o]
    procs: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    restarts: dict[int, list[float]] = {}

    def spawn(i: int) -> None:
        p = subprocess.Popen(cmd, env=dict(env, **{WORKER_ENV: str(i)}))
        procs[i] = p
        logger().info("worker_started", worker=i, pid=p.pid)

    def forward(sig: int) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(sig)

    def on_term(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        forward(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, lambda signum, _f: forward(signal.SIGHUP))
    for i in range(n):
        spawn(i)
    deadline: float | None = None
    failed = False
    try:
        while procs:
            time.sleep(0.2)
            for i, p in list(procs.items()):
                code = p.poll()
                if code is None:
                    continue
                del procs[i]
                _mark_dead(p.pid, metrics_dir)
                if stopping:
                    continue
                logger().error("worker_exited", worker=i, pid=p.pid, code=code)
                if code == 2:  # a config or startup error (port in use): restarts fail alike
                    failed = stopping = True
                    forward(signal.SIGTERM)
                    continue
                recent = [t for t in restarts.get(i, []) if t > time.time() - 60]
                restarts[i] = [*recent, time.time()]
                if len(recent) >= 10:
                    logger().error("worker_crash_loop", worker=i)
                    stopping = True
                    forward(signal.SIGTERM)
                    continue
                spawn(i)
            if stopping and deadline is None:
                deadline = time.time() + s.shutdown_drain_s + s.shutdown_grace_s + 5
            if deadline is not None and time.time() > deadline:
                forward(signal.SIGKILL)
    finally:
        # Never leave a worker behind, even when supervising itself failed.
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=s.shutdown_drain_s + s.shutdown_grace_s + 5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 2 if failed else 0


def _mark_dead(pid: int, metrics_dir: str) -> None:
    # The directory is only in the workers' environment, not in ours: pass it explicitly.
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except (ImportError, OSError, ValueError):
        pass
