"""A real HAProxy (Debian's `haproxy`) in front of a real `gateway run`, started by the test
on free ports: with `send-proxy-v2` and with `send-proxy` (v1), the address HAProxy saw the
client connect from is the logged client_ip, over IPv4 and IPv6, and X-Forwarded-For is
trusted after it only when that address is a trusted proxy."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import anthropic
import httpx2 as httpx  # the HTTP client the anthropic SDK is built on

from tests.integration.test_lifecycle import OPEN_POLICY
from tests.support.cli import GatewayProcess, gateway_process
from tests.support.gateway import poll
from tests.support.redis_server import free_port
from tests.support.transcript import TRANSCRIPT
from tests.support.upstream import FakeUpstream


def _free_port6() -> int:
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        port: int = sock.getsockname()[1]
        return port


class HAProxy:
    """`haproxy -db` in TCP mode: `v2` (IPv4 and IPv6 frontends) and `v1` send the PROXY
    header to the gateway at 127.0.0.1:`backend_port`."""

    def __init__(self, tmp: Path, backend_port: int) -> None:
        binary = shutil.which("haproxy")
        assert binary is not None, ("the haproxy binary is needed (Debian package `haproxy`, "
                                    "which .ci/run installs)")
        self.v2, self.v2_6, self.v1 = free_port(), _free_port6(), free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe_v2
    bind 127.0.0.1:{self.v2}
    bind [::1]:{self.v2_6}
    default_backend be_v2
backend be_v2
    server gw 127.0.0.1:{backend_port} send-proxy-v2
frontend fe_v1
    bind 127.0.0.1:{self.v1}
    default_backend be_v1
backend be_v1
    server gw 127.0.0.1:{backend_port} send-proxy
""")
        check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True,
                               timeout=30, check=False)
        assert check.returncode == 0, f"haproxy refused its config: {check.stderr}"
        self.output: list[str] = []
        self.proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            TRANSCRIPT.output("haproxy", line)
            self.output.append(line)

    def listening(self) -> bool:
        assert self.proc.poll() is None, f"haproxy exited: {''.join(self.output)}"
        for family, host, port in ((socket.AF_INET, "127.0.0.1", self.v2),
                                   (socket.AF_INET6, "::1", self.v2_6),
                                   (socket.AF_INET, "127.0.0.1", self.v1)):
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if s.connect_ex((host, port)) != 0:
                    return False
        return True

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


#: HAProxy (127.0.0.1) may send the header; 127.0.0.9 is a trusted proxy in front of it.
CLIENT_IP = {"proxy_protocol": "any", "proxy_protocol_from": ["127.0.0.1/32"],
             "trusted_proxies": ["127.0.0.9/32"]}


async def _call(url: str, key: str, source: str, headers: dict[str, str] | None = None) -> str:
    """One Messages call with the Anthropic SDK from the local address `source`."""
    transport = httpx.AsyncHTTPTransport(local_address=source)
    async with httpx.AsyncClient(transport=transport) as http, anthropic.AsyncAnthropic(
            base_url=url, api_key=key, max_retries=0, http_client=http,
            default_headers=headers or {}) as client:
        msg = await client.messages.create(model="claude-test-1", max_tokens=8,
                                           messages=[{"role": "user", "content": "hi"}])
    text: str = msg.content[0].text  # type: ignore[union-attr]
    return text


async def _logged(gw: GatewayProcess, n: int) -> dict[str, Any]:
    lines = await poll(lambda: len(gw.events("request")) >= n and gw.events("request"),
                       timeout=15)
    last: dict[str, Any] = lines[n - 1]
    return last


async def test_client_address_through_haproxy(tmp_path: Path, upstream: FakeUpstream) -> None:
    """Through HAProxy with send-proxy-v2 (IPv4 and IPv6) and send-proxy (v1), the request
    line's client_ip and peer_ip are the address HAProxy saw, not HAProxy's own; a client
    address that is a trusted proxy has its X-Forwarded-For followed, another has it
    ignored."""
    async with gateway_process(tmp_path, upstream.url, OPEN_POLICY, client_ip=CLIENT_IP) as gw:
        proxy = HAProxy(tmp_path, gw.port or 0)
        try:
            await poll(proxy.listening, timeout=30)
            _, issued = await gw.issue_key()
            xff = {"X-Forwarded-For": "198.51.100.1"}
            cases = [  # (frontend, client source, headers) -> (client_ip, peer_ip)
                (f"http://127.0.0.1:{proxy.v2}", "127.0.0.10", xff, "127.0.0.10", "127.0.0.10"),
                (f"http://[::1]:{proxy.v2_6}", "::1", {}, "::1", "::1"),
                (f"http://127.0.0.1:{proxy.v1}", "127.0.0.11", {}, "127.0.0.11", "127.0.0.11"),
                (f"http://127.0.0.1:{proxy.v2}", "127.0.0.9", xff, "198.51.100.1", "127.0.0.9"),
            ]
            for n, (url, source, headers, client_ip, peer_ip) in enumerate(cases, 1):
                assert await _call(url, issued, source, headers) == upstream.reply_text
                line = await _logged(gw, n)
                assert (line["client_ip"], line["peer_ip"]) == (client_ip, peer_ip), line
            assert line["country"] == "CN"  # located from the trusted proxy's X-Forwarded-For
            assert upstream.requests[0].headers["X-Forwarded-For"] == "127.0.0.10"
            assert not gw.events("proxy_protocol_rejected")
        finally:
            proxy.stop()
