"""Real `redis-server` processes on free ports, owned by the test that starts them.

`RedisServer` runs one standalone server, `RedisCluster` three cluster-enabled
masters joined into one cluster, `RedisSentinel` one server watched by one
Sentinel. Each server lives in its own temporary directory, persists nothing
and listens on 127.0.0.1 only; nothing here ever connects to a Redis it did
not start.
"""

from __future__ import annotations

import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

import redis

HOST = "127.0.0.1"
#: Generous: a loaded CI machine may take seconds to fork and bind.
READY_TIMEOUT_S = 10.0
CLUSTER_TIMEOUT_S = 30.0
_POLL_S = 0.02
_SLOTS = 16384
#: A cluster node also listens on port + 10000 (the cluster bus).
_BUS_OFFSET = 10000


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port P of 127.0.0.1 whose cluster-bus port P + 10000 is free too."""
    for _attempt in range(100):
        port = free_port()
        if port + _BUS_OFFSET > 65535:
            port = random.randint(20000, 65535 - _BUS_OFFSET)
        try:
            for candidate in (port, port + _BUS_OFFSET):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((HOST, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("found no free port pair for a Redis Cluster node")


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found on PATH; install Redis (e.g. apt-get install redis-server) "
            "to run the tests that need a real Redis"
        )
    return path


def _server_pid(port: int) -> int | None:
    """The process id of the Redis answering PING on `port`, None if none answers yet."""
    try:
        with redis.Redis(
            host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=2.0
        ) as client:
            client.ping()
            pid: int = client.info("server")["process_id"]
            return pid
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
        return None


class _Managed:
    """`with` support for the process helpers below: start on entry, stop on exit."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisServer(_Managed):
    """One `redis-server` process on a free port of 127.0.0.1.

    `start()` returns once the server answers PING. `kill()` simulates a
    crash (SIGKILL), `restart()` brings the server back on the same port, and
    `stop()` shuts it down and removes its directory. Usable as a (sync)
    context manager.
    """

    def __init__(self, extra_args: Sequence[str] = (), port: int | None = None) -> None:
        """Prepare a server; `extra_args` are appended to the command line."""
        self.host = HOST
        self.port = port if port is not None else self._pick_port()
        self.extra_args = list(extra_args)
        self._fixed_port = port is not None
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def _pick_port(self) -> int:
        return free_port()

    @property
    def url(self) -> str:
        """`redis://127.0.0.1:<port>/0`."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def directory(self) -> Path:
        """The server's working directory (created on first start)."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        return self._dir

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self._process is not None and self._process.poll() is None

    def ping(self) -> bool:
        """True when this server's process answers PING right now."""
        return self._process is not None and _server_pid(self.port) == self._process.pid

    def start(self) -> None:
        """Start the process and wait until it answers PING.

        If the port was picked automatically and got taken in the meantime,
        another free port is tried.
        """
        if self.running:
            raise RuntimeError(f"redis-server on port {self.port} is already running")
        binary = _binary("redis-server")
        try:
            for _attempt in range(5):
                try:
                    self._launch(binary)
                    return
                except _PortTaken:
                    if self._fixed_port:
                        break
                    self.port = self._pick_port()
            raise RuntimeError(f"redis-server could not bind port {self.port}: already in use")
        except BaseException:
            self.stop()  # no process left behind, no directory either
            raise

    def _command(self, binary: str) -> list[str]:
        """The command line starting this server on `self.port`."""
        return [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            *self.extra_args,
        ]  # fmt: skip

    def _launch(self, binary: str) -> None:
        log = self.directory / "redis.log"
        args = self._command(binary)
        with log.open("ab") as out:
            self._process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        # Compare process ids: a port taken by someone else must not pass for ours.
        while _server_pid(self.port) != self._process.pid:
            code = self._process.poll()
            if code is not None:
                self._process = None
                text = log.read_text(errors="replace")
                if "Address already in use" in text:
                    log.unlink()
                    raise _PortTaken
                raise RuntimeError(
                    f"redis-server on port {self.port} exited with {code}:\n{text[-2000:]}"
                )
            if time.monotonic() > deadline:
                self._terminate(signal.SIGKILL)
                raise RuntimeError(
                    f"redis-server on port {self.port} did not answer PING "
                    f"within {READY_TIMEOUT_S} s"
                )
            time.sleep(_POLL_S)
        self._fixed_port = True  # restarts must come back on the same port

    def _terminate(self, sig: signal.Signals) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(timeout=READY_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL) and wait for the process to be gone; data is lost."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> None:
        """Stop the server if it runs, then start it again on the same port."""
        self._terminate(signal.SIGTERM)
        self.start()

    def stop(self) -> None:
        """Shut the server down and remove its directory."""
        self._terminate(signal.SIGTERM)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __repr__(self) -> str:
        """Show the port and whether the process runs."""
        return f"<RedisServer port={self.port} running={self.running}>"


class _PortTaken(Exception):
    """The chosen port was taken between picking and binding it."""


class _ClusterNode(RedisServer):
    """A cluster-enabled server; its port leaves room for the cluster bus."""

    def __init__(self) -> None:
        super().__init__(
            [
                "--cluster-enabled", "yes",
                # Relative to the server's --dir: its own temporary directory.
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000",
            ]
        )  # fmt: skip

    def _pick_port(self) -> int:
        return free_cluster_port()


class RedisCluster(_Managed):
    """A Redis Cluster of three masters (no replicas) on free ports of 127.0.0.1.

    `start()` returns once every node reports `cluster_state:ok`. The cluster
    is created with `redis-cli --cluster create` when redis-cli is on PATH
    (`use_redis_cli=None`), otherwise with CLUSTER ADDSLOTSRANGE and CLUSTER
    MEET. `servers` gives access to single nodes (e.g. to kill one).
    """

    def __init__(self, masters: int = 3, *, use_redis_cli: bool | None = None) -> None:
        """Prepare `masters` cluster-enabled servers."""
        self.servers: list[RedisServer] = [_ClusterNode() for _ in range(masters)]
        self.use_redis_cli = (
            shutil.which("redis-cli") is not None if use_redis_cli is None else use_redis_cli
        )

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node."""
        return [(server.host, server.port) for server in self.servers]

    @property
    def url(self) -> str:
        """`redis+cluster://127.0.0.1:<port of the first node>`."""
        host, port = self.nodes[0]
        return f"redis+cluster://{host}:{port}"

    def start(self) -> None:
        """Start the nodes, join them into one cluster and wait until it is ok."""
        try:
            for server in self.servers:
                server.start()
            if self.use_redis_cli:
                self._create_with_redis_cli()
            else:
                self._create_with_commands()
            self._wait_until_ok()
        except BaseException:
            self.stop()
            raise

    def _create_with_redis_cli(self) -> None:
        args = [
            _binary("redis-cli"),
            "--cluster", "create",
            *(f"{host}:{port}" for host, port in self.nodes),
            "--cluster-replicas", "0",
            "--cluster-yes",
        ]  # fmt: skip
        result = subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=CLUSTER_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise RuntimeError(f"redis-cli --cluster create failed:\n{output}")

    def _create_with_commands(self) -> None:
        count = len(self.servers)
        bounds = [_SLOTS * index // count for index in range(count + 1)]
        first_host, first_port = self.nodes[0]
        for index, (host, port) in enumerate(self.nodes):
            with redis.Redis(host=host, port=port, socket_timeout=READY_TIMEOUT_S) as client:
                client.execute_command(
                    "CLUSTER", "ADDSLOTSRANGE", bounds[index], bounds[index + 1] - 1
                )
                if index:
                    client.execute_command("CLUSTER", "MEET", first_host, first_port)

    def _wait_until_ok(self) -> None:
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        pending = list(self.nodes)
        while pending:
            host, port = pending[0]
            with redis.Redis(host=host, port=port, socket_timeout=READY_TIMEOUT_S) as client:
                info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
            if (
                fields.get("cluster_state") == "ok"
                and fields.get("cluster_known_nodes") == str(len(self.nodes))
                and fields.get("cluster_slots_ok") == str(_SLOTS)
            ):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Redis Cluster node {host}:{port} not ok within {CLUSTER_TIMEOUT_S} s:\n{text}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node and remove their directories."""
        for server in self.servers:
            server.stop()


class _SentinelProcess(RedisServer):
    """One Redis Sentinel (`redis-server <conf> --sentinel`) monitoring `master` as `service`.

    Its config file is (re)written into its own temporary directory on every launch, since
    Sentinel insists on a writable config file it can rewrite.
    """

    def __init__(self, master: RedisServer, service: str) -> None:
        super().__init__()
        self.master = master
        self.service = service

    def _command(self, binary: str) -> list[str]:
        conf = self.directory / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f"dir {self.directory}\n"
            f"sentinel monitor {self.service} {self.master.host} {self.master.port} 1\n"
            f"sentinel down-after-milliseconds {self.service} 1000\n"
            f"sentinel failover-timeout {self.service} 5000\n"
        )
        return [binary, str(conf), "--sentinel"]


class RedisSentinel(_Managed):
    """A redis-server master monitored by one Redis Sentinel, both on free ports of 127.0.0.1.

    `start()` returns once the sentinel reports the master's address for `service` and sees
    it up as a master. `url` is the gateway's `redis+sentinel://` store URL; `master` is the
    monitored RedisServer and `sentinel_port` the sentinel's port. Usable as a (sync) context
    manager; `stop()` stops both processes and removes their directories.
    """

    def __init__(self, service: str = "gwmaster") -> None:
        """Prepare the master and the sentinel monitoring it as `service`."""
        self.service = service
        self.master = RedisServer()
        self._sentinel = _SentinelProcess(self.master, service)

    @property
    def host(self) -> str:
        """The sentinel's host."""
        return self._sentinel.host

    @property
    def sentinel_port(self) -> int:
        """The sentinel's port."""
        return self._sentinel.port

    @property
    def url(self) -> str:
        """`redis+sentinel://127.0.0.1:<sentinel port>/<service>/0`."""
        return f"redis+sentinel://{self.host}:{self.sentinel_port}/{self.service}/0"

    @property
    def running(self) -> bool:
        """True while both processes are alive."""
        return self.master.running and self._sentinel.running

    def start(self) -> None:
        """Start the master, then the sentinel, and wait until the sentinel monitors it."""
        try:
            self.master.start()
            self._sentinel.start()
            self._wait_until_monitoring()
        except BaseException:
            self.stop()
            raise

    def _monitoring(self) -> bool:
        try:
            with redis.Redis(
                host=self.host, port=self.sentinel_port,
                socket_connect_timeout=0.5, socket_timeout=2.0, decode_responses=True,
            ) as client:  # fmt: skip
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                if addr is None or list(addr) != [self.master.host, str(self.master.port)]:
                    return False
                # Wait until it has reached the master too, so that clients (which check the
                # flags) do not take it for down.
                fields = client.execute_command("SENTINEL", "MASTER", self.service)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        state = dict(fields) if isinstance(fields, dict) else dict(zip(
            fields[::2], fields[1::2], strict=True))
        return bool(state.get("flags") == "master" and state.get("role-reported") == "master")

    def _wait_until_monitoring(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S * 3
        while not self._monitoring():
            if not self.running:
                raise RuntimeError("the Redis master or its sentinel exited while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"sentinel on port {self.sentinel_port} did not report master "
                    f"{self.service} at {self.master.host}:{self.master.port} "
                    f"within {READY_TIMEOUT_S * 3} s"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop the sentinel and the master and remove their directories."""
        self._sentinel.stop()
        self.master.stop()

    def __repr__(self) -> str:
        """Show the ports and whether both processes run."""
        return (
            f"<RedisSentinel sentinel={self.sentinel_port} master={self.master.port} "
            f"running={self.running}>"
        )


__all__ = [
    "HOST",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "free_cluster_port",
    "free_port",
]
