"""`make demo`: the gateway's main job on embedded defaults, end to end, in one command.

Starts the stand-in model API, starts `gateway run --config config/gateway.yaml` pointed at it,
issues reseller keys with the CLI, sends requests with the official `anthropic` SDK through a
trusted proxy from several countries, and prints what happened, log lines included. It ends
with reseller screening: a relaying reseller and an honest one, then the report, and at the
edge: two more gateway processes, one speaking TLS with client certificates bound to a
reseller (and tracing on), one taking the PROXY protocol (v2) from a load balancer.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anthropic  # the `demo` extra: without it `make demo` says so and exits 2
import yaml

from gateway.proxy_protocol import v2_header
from tests.support.standin import FakeUpstream
from tools.pki import CertificateAuthority

REPO = Path(__file__).resolve().parents[1]
CONFIG = "config/gateway.yaml"
W = 100


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _h(title: str) -> None:
    print(f"\n{'─' * W}\n▶ {title}\n{'─' * W}")



def _answer_summary(data: bytes) -> str:
    """A raw HTTP answer as "status type / code" (the §6 error body), or the status alone."""
    status = data.split(b" ", 2)[1].decode()
    try:
        err = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]
        return f"{status} {err['type']} / {err['code']}"
    except (ValueError, KeyError, IndexError, TypeError):
        return status

class Demo:
    def __init__(self) -> None:
        self.port = _free_port()
        self.admin_port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, GATEWAY_ADMIN_TOKEN="demo-admin-" + secrets.token_hex(8),
                        UPSTREAM_API_KEY="demo-upstream-" + secrets.token_hex(8))
        self.logs: list[dict[str, Any]] = []  # the main gateway's JSON lines, as collected
        self.gw: GatewayProcess | None = None
        self.outcomes: list[tuple[str, str]] = []

    # --- processes ----------------------------------------------------------------------
    async def start_gateway(self, upstream_url: str) -> None:
        sets = ["shutdown_grace_s=5", "shutdown_drain_s=1"]
        print("$ gateway run --config", CONFIG, f"--set upstream.url={upstream_url}",
              f"--set listen=127.0.0.1:{self.port}",
              f"--set admin_listen=127.0.0.1:{self.admin_port}",
              " ".join(f"--set {x}" for x in sets))
        self.gw = GatewayProcess(self.env, upstream_url, self.port, self.admin_port)
        self.gw.logs = self.logs
        print(f"gateway ready: /readyz → 200 {await self.gw.start(sets)}")

    async def stop_gateway(self) -> None:
        if self.gw is not None and await self.gw.stop():
            print(f"gateway stopped on SIGTERM (exit {self.gw.returncode})")

    async def cli(self, *args: str, show: bool = True,
                  admin_port: int | None = None) -> tuple[int, str]:
        cmd = [sys.executable, "-m", "gateway", *args, "--config", CONFIG,
               "--set", f"admin_listen=127.0.0.1:{admin_port or self.admin_port}"]
        if show:
            print("$ gateway", " ".join(args))
        p = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, env=self.env,
                                                 stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
        out, _ = await p.communicate()
        return p.returncode or 0, out.decode()

    async def issue(self, *args: str, admin_port: int | None = None) -> str:
        code, out = await self.cli("keys", "issue", *args, "--json", admin_port=admin_port)
        if code:
            raise SystemExit(f"keys issue failed: {out}")
        doc = json.loads(out)
        print(f"  → key_id {doc['key_id']} (the full key is printed once; hidden here)")
        return str(doc["key"])

    # --- requests -----------------------------------------------------------------------
    async def ask(self, label: str, key: str, client_ip: str, *, stream: bool = False,
                  customer: tuple[str, str] | None = None, max_tokens: int = 64,
                  base_url: str | None = None,
                  http_client: anthropic.DefaultAsyncHttpxClient | None = None) -> None:
        headers = {"X-Forwarded-For": client_ip}
        if customer:
            headers.update({"X-Customer-Id": customer[0], "X-Customer-IP": customer[1]})
        client = anthropic.AsyncAnthropic(base_url=base_url or self.url, api_key=key,
                                          max_retries=0, default_headers=headers,
                                          http_client=http_client)
        who = f"from {client_ip}" + (f" for customer {customer[0]}@{customer[1]}"
                                     if customer else "")
        msgs: list[Any] = [{"role": "user", "content": "Hello"}]
        try:
            if stream:
                parts = []
                arrivals = []
                t0 = time.monotonic()
                async with client.messages.stream(model="claude-demo-1", max_tokens=max_tokens,
                                                  messages=msgs) as s:
                    async for text in s.text_stream:
                        arrivals.append(f"+{(time.monotonic() - t0) * 1000:.0f}ms")
                        parts.append(text)
                    final = await s.get_final_message()
                result = (f"200 streamed {''.join(parts)!r}; the {len(parts)} text events "
                          f"arrived live at {', '.join(arrivals)} (the stand-in sends one "
                          f"every 50 ms); usage in {final.usage.input_tokens}, "
                          f"out {final.usage.output_tokens}")
            else:
                raw = await client.messages.with_raw_response.create(
                    model="claude-demo-1", max_tokens=max_tokens, messages=msgs)
                msg = await raw.parse()
                rl = raw.headers.get("anthropic-ratelimit-requests-remaining")
                text = getattr(msg.content[0], "text", "")
                result = f"200 {text!r} (requests remaining {rl})"

        except anthropic.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            err = body.get("error", {}) if isinstance(body, dict) else {}
            extra = ""
            if exc.status_code == 429:
                h = exc.response.headers
                extra = (f" retry-after={h.get('retry-after')}s, output-tokens remaining="
                         f"{h.get('anthropic-ratelimit-output-tokens-remaining')}, requests "
                         f"remaining={h.get('anthropic-ratelimit-requests-remaining')}")
            result = f"{exc.status_code} {err.get('type')} / {err.get('code')}{extra}"
        finally:
            await client.close()
        self.outcomes.append((label, result))
        print(f"  {label:<46} {who}\n      ⇒ {result}")

    # --- the story ----------------------------------------------------------------------
    async def run(self) -> None:
        async with FakeUpstream() as upstream:
            upstream.reply_text = "Hello from the model behind the gateway."
            upstream.chunks = 5
            upstream.event_delay_s = 0.05
            upstream.output_tokens = 40
            _h("1. Start a stand-in model API (Anthropic Messages wire format) and the gateway")
            print(f"stand-in model API on {upstream.url}")
            await self.start_gateway(upstream.url)
            try:
                await self.story(upstream)
            finally:
                await self.stop_gateway()
            self.print_logs()
            await self.edge(upstream)
        self.screening_page()

    async def story(self, upstream: FakeUpstream) -> None:
        _h("2. Issue reseller keys with the CLI (embedded store: through the admin API)")
        direct = await self.issue("--reseller", "direct", "--name", "demo-direct")
        acme = await self.issue("--reseller", "acme", "--name", "acme-prod")
        tight = await self.issue("--reseller", "direct", "--name", "tight", "--rpm", "3")
        otpm = await self.issue("--reseller", "direct", "--name", "small-otpm", "--otpm", "100")

        _h("3. Requests through a trusted proxy (127.0.0.1 sends X-Forwarded-For) from "
           "several places")
        await self.ask("US client, plain request", direct, "192.0.2.10")
        await self.ask("US client, streaming (SSE passes through live)", direct, "192.0.2.11",
                       stream=True)
        await self.ask("GB client", direct, "192.0.2.20")
        await self.ask("CN client (restricted region)", direct, "198.51.100.5")
        await self.ask("IR client over IPv6", direct, "2001:db8:98::1")
        await self.ask("VPN exit (anonymizer)", direct, "203.0.113.5")
        await self.ask("hosting provider (shadow rule: logged only)", direct, "203.0.113.35")

        _h("4. A reseller (acme) must attest its downstream customer")
        await self.ask("acme, no attestation", acme, "192.0.2.12")
        await self.ask("acme, customer in JP", acme, "192.0.2.12",
                       customer=("cust-42", "192.0.2.50"))
        await self.ask("acme from the US, customer in IR", acme, "192.0.2.12",
                       customer=("cust-43", "198.51.100.33"))
        await self.ask("acme, customer in SG (registered country)", acme, "192.0.2.12",
                       customer=("cust-44", "203.0.113.85"))

        _h("5. Rate limits: a key with rpm 3, and one with 100 output tokens per minute")
        for i in range(4):
            await self.ask(f"tight key, request {i + 1}", tight, "192.0.2.13")
        await self.ask("small-otpm key, max_tokens 60 (upstream reports 40)", otpm,
                       "192.0.2.14", max_tokens=60)
        await self.ask("again: 40 used + 60 reserved ≤ 100", otpm, "192.0.2.14",
                       max_tokens=60)
        await self.ask("again: 80 used + 60 reserved > 100", otpm, "192.0.2.14",
                       max_tokens=60)

        await self.walkarounds(upstream)

        _h("6. Explain a decision, look up an address")
        _, out = await self.cli("explain", "--ip", "192.0.2.12", "--reseller", "acme",
                                "--customer-ip", "198.51.100.33", "--customer-id", "cust-43",
                                "--model", "claude-demo-1")
        print("  " + out.rstrip().replace("\n", "\n  "))
        _, out = await self.cli("geo", "lookup", "203.0.113.5")
        print("  " + out.rstrip().replace("\n", "\n  "))

        _h("7. Revoke a key: refused at once")
        kid = direct.split("_")[1]
        _, out = await self.cli("keys", "revoke", kid)
        print("  " + out.rstrip())
        await self.ask("revoked key", direct, "192.0.2.10")
        seen = upstream.requests
        leaked = [r for r in seen if any(k in (r.headers.get("x-api-key", "") +
                                              r.headers.get("authorization", ""))
                                         for k in (direct, acme, tight, otpm))]
        print(f"\n  the stand-in saw {len(seen)} requests; "
              f"{len(leaked)} carried a reseller key (the gateway swaps in its own credential)")

        _h("7b. Operator tools: update a live key, show it, check a broken config")
        okid = otpm.split("_")[1]
        _, out = await self.cli("keys", "update", okid, "--otpm", "1000")
        print("  " + out.rstrip().replace("\n", "\n  "))
        await self.ask("small-otpm key after keys update --otpm 1000", otpm, "192.0.2.14",
                       max_tokens=60)
        _, out = await self.cli("keys", "show", okid)
        print("  " + out.rstrip().replace("\n", "\n  "))
        broken = Path(tempfile.mkdtemp(prefix="gateway-demo-")) / "broken.yaml"
        broken.write_text("listen: 127.0.0.1:9090\nadmin_listen: 127.0.0.1:9090\n"
                          "upstream:\n  read_timeout_s: -1\n"
                          "geo: {asn_db: null}\n")
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "check-config", "--config", str(broken),
            cwd=REPO, env=self.env, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        out_b, _ = await p.communicate()
        print(f"$ gateway check-config --config broken.yaml   (exit {p.returncode}: every "
              "error of the file at once)")
        print("  " + out_b.decode().rstrip().replace(str(broken), "broken.yaml")
              .replace("\n", "\n  "))

        await self.quotas()

        _h("8. The audit trail: every administrative change, kept in the store")
        _, out = await self.cli("audit", "list")
        print("  " + out.rstrip().replace("\n", "\n  "))

        await self.screening()

    async def screening(self) -> None:
        """Two more resellers: relayco relays restricted-region customers through an allowed
        US datacenter, fairco serves honest customers; then the screening report."""
        _h("8b. Reseller screening: a relaying reseller and an honest one, then the report")
        policy = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())
        for name in ("relayco", "fairco"):
            policy["resellers"][name] = {"status": "active", "require_customer": True}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "policy.yaml"
            path.write_text(yaml.safe_dump(policy))
            _, out = await self.cli("policy", "apply", str(path))
        print("  " + out.rstrip().replace("\n", "\n  "))
        relay = await self.issue("--reseller", "relayco", "--name", "relay-dc")
        fair = await self.issue("--reseller", "fairco", "--name", "fair-prod")
        await asyncio.sleep(1.0)  # the policy reaches the gateway within a second
        mix = relay_mix("192.0.2.1")
        print(f"  relayco from 192.0.2.1 (US datacenter, AS64500): {len(mix)} requests: CN "
              "and KP customers, VPN and Tor customers, 12 customer ids on one address, a "
              "private and its own egress address as 'customer', one customer in 5 countries")
        relay_codes = await self.burst(relay, "192.0.2.1", mix)
        print(f"      ⇒ statuses {sorted(relay_codes.items())}")
        fair_mix = [(f"fair-{i}", ip) for i, ip in enumerate(
            ("192.0.2.2", "192.0.2.34", "192.0.2.50", "192.0.2.66"))] * 3
        print(f"  fairco from 192.0.2.17 (GB): {len(fair_mix)} requests of 4 customers in "
              "US, DE, JP and FR, each always from its own address")
        fair_codes = await self.burst(fair, "192.0.2.17", fair_mix)
        print(f"      ⇒ statuses {sorted(fair_codes.items())}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the tallies reach the store within a second
            code, out = await self.cli("report", "resellers", "--json", show=False)
            doc = json.loads(out) if code == 0 else {"resellers": []}
            if any(r["reseller"] == "relayco" and r["flagged"] for r in doc["resellers"]):
                break
            await asyncio.sleep(0.3)
        _, out = await self.cli("report", "resellers")
        print("  " + out.rstrip().replace("\n", "\n  "))
        alerts = [x for x in self.logs if x.get("event") == "screening_alert"]
        print("\n  screening_alert lines (once per transition to flag; mode shadow: alert "
              "only):")
        for a in alerts:
            print(f"    {a['reseller']}: {a['signal']} = {a['value']} "
                  f"(threshold {a['threshold']})")

    async def burst(self, key: str, egress: str,
                    mix: list[tuple[str, str]]) -> dict[int, int]:
        """One SDK request per (customer id, customer ip), quietly; count per status."""
        client = anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0,
                                          default_headers={"X-Forwarded-For": egress})
        codes: dict[int, int] = {}
        try:
            for cid, cip in mix:
                try:
                    await client.messages.create(
                        model="claude-demo-1", max_tokens=16,
                        messages=[{"role": "user", "content": "Hello"}],
                        extra_headers={"X-Customer-Id": cid, "X-Customer-IP": cip})
                    code = 200
                except anthropic.APIStatusError as exc:
                    code = exc.status_code
                codes[code] = codes.get(code, 0) + 1
        finally:
            await client.close()
        return codes

    async def quotas(self) -> None:
        _h("7c. A daily quota runs out; the usage ledger (forwarded requests only)")
        quota = await self.issue("--reseller", "acme", "--name", "trial",
                                 "--quota", "daily.requests=2")
        for i in range(3):
            await self.ask(f"trial key (daily.requests=2), request {i + 1}", quota,
                           "192.0.2.16", customer=("cust-42", "192.0.2.50"))
        # Instances add their tallies to the ledger once a second: wait for this one's.
        kid = quota.split("_")[1]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            _, out = await self.cli("usage", "--key", kid, "--json", show=False)
            if json.loads(out)["totals"]["requests"] >= 2:
                break
            await asyncio.sleep(0.2)
        for args in (("usage", "--since", "24h"), ("usage", "--by", "customer"),
                     ("usage", "--key", kid, "--csv")):
            _, out = await self.cli(*args)
            print("  " + out.rstrip().replace("\n", "\n  "))

    async def raw(self, label: str, method: str, target: str, headers: dict[str, str],
                  body: bytes = b"", hang_up_after: bytes | None = None,
                  port: int | None = None, prefix: bytes = b"") -> None:
        """One request on a raw socket to `port` (the demo gateway's by default), exactly as
        written (no client library tidies it), after the bytes `prefix` (a PROXY header)."""
        lines = [f"{method} {target} HTTP/1.1", "Host: gateway", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers.items())]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        reader, writer = await asyncio.open_connection("127.0.0.1", port or self.port)
        writer.write(prefix + ("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await writer.drain()
        if hang_up_after is not None:
            head = await reader.readuntil(hang_up_after)
            result = f"{head.split(b' ', 2)[1].decode()}, hung up after {hang_up_after.decode()}"
        else:
            try:
                data = await asyncio.wait_for(reader.read(), 30)
            except ConnectionResetError:
                data = b""
            result = _answer_summary(data) if data else "connection closed, nothing answered"
        writer.close()
        self.outcome(label, result)

    def outcome(self, label: str, result: str) -> None:
        """Record and print what one raw-socket request got."""
        self.outcomes.append((label, result))
        print(f"  {label:<58}\n      ⇒ {result}")

    async def walkarounds(self, upstream: FakeUpstream) -> None:
        _h("5b. Trying to walk around it (raw sockets, as an attacker would)")
        scoped = await self.issue("--reseller", "direct", "--name", "messages-only", "--paths",
                                  "/v1/messages", "--models", "claude-*", "--otpm", "1000")
        h = {"x-api-key": scoped, "X-Forwarded-For": "192.0.2.15",
             "content-type": "application/json"}
        msg = {"model": "claude-demo-1", "max_tokens": 400,
               "messages": [{"role": "user", "content": "hi"}]}
        await self.raw("GET /v1/messages/../models (leave the path scope)", "GET",
                       "/v1/messages/../models", h)
        await self.raw("GET /v1/messages/%2e%2e/models (encoded dot segment)", "GET",
                       "/v1/messages/%2e%2e/models", h)
        await self.raw("no key, broken JSON (key is checked first)", "POST", "/v1/messages",
                       {"X-Forwarded-For": "192.0.2.15"}, b'{"model": ')
        await self.raw("gpt-4o behind a UTF-8 BOM, text/plain", "POST", "/v1/messages",
                       {**h, "content-type": "text/plain"},
                       b"\xef\xbb\xbf" + json.dumps({**msg, "model": "gpt-4o"}).encode())
        await self.raw('"model" named twice', "POST", "/v1/messages", h,
                       b'{"model": "gpt-4o", "model": "claude-demo-1", "max_tokens": 5}')
        await self.raw('max_tokens "4096" (a string)', "POST", "/v1/messages", h,
                       json.dumps({**msg, "max_tokens": "4096"}).encode())
        stream = json.dumps({**msg, "stream": True}).encode()
        for i in range(2):
            await self.raw(f"stream with max_tokens 400, hang up early ({i + 1})", "POST",
                           "/v1/messages", h, stream, hang_up_after=b"message_start")
        await asyncio.sleep(1.0)  # let both cut streams settle
        await self.raw("third stream: 2 x 400 charged of otpm 1000", "POST", "/v1/messages",
                       h, stream)

    async def edge(self, upstream: FakeUpstream) -> None:
        """Two more gateways: TLS with a reseller bound to a client certificate (and tracing
        on), and the PROXY protocol from a load balancer on 127.0.0.1."""
        _h("10. At the edge: TLS, client certificates, PROXY protocol")
        with tempfile.TemporaryDirectory(prefix="gateway-demo-edge-") as folder:
            await self._edge(upstream, Path(folder))

    async def _edge(self, upstream: FakeUpstream, tmp: Path) -> None:
        ca = demo_pki(tmp)
        fp = ca["client_sha256"]
        policy = yaml.safe_load((REPO / "config" / "policy.yaml").read_text())
        policy["resellers"]["boundco"] = {"status": "active", "require_customer": False,
                                          "countries": ["US", "GB", "DE", "JP", "FR", "NL"],
                                          "client_cert_sha256": [fp]}
        (tmp / "policy.yaml").write_text(yaml.safe_dump(policy))
        print(f"  a throwaway CA, a server certificate for 127.0.0.1 and a client certificate "
              f"(cryptography, EC P-256);\n  policy: reseller boundco has client_cert_sha256: "
              f"[{fp[:8]}…{fp[-4:]}]")
        tracing = tracing_available()
        tls_sets = [f"tls.cert_file={tmp / 'server.crt'}", f"tls.key_file={tmp / 'server.key'}",
                    f"tls.client_ca_file={tmp / 'ca.crt'}",
                    f"policy_file={tmp / 'policy.yaml'}"]
        if tracing:
            tls_sets += ["tracing.enabled=true", "tracing.exporter=none"]
        pp_sets = ["client_ip.proxy_protocol=v2", "client_ip.proxy_protocol_from=[127.0.0.1/32]"]
        quick_stop = ["shutdown_grace_s=5", "shutdown_drain_s=0.2"]
        tls_gw = GatewayProcess(self.env, upstream.url)
        pp_gw = GatewayProcess(self.env, upstream.url)
        try:
            await tls_gw.start([*quick_stop, *tls_sets])
            await pp_gw.start([*quick_stop, *pp_sets])
            await self.edge_tls(tls_gw, tmp, upstream, tracing)
            await self.edge_proxy(pp_gw)
        finally:
            await asyncio.gather(tls_gw.stop(), pp_gw.stop())
        pp_lines = [x for x in pp_gw.logs if x.get("event") == "request"]
        rejected = [x for x in pp_gw.logs if x.get("event") == "proxy_protocol_rejected"]
        print("\n  the PROXY gateway's log:")
        for x in pp_lines:
            print(f"    request: status {x['status']}, client_ip {x['client_ip']}, peer_ip "
                  f"{x.get('peer_ip')}, country {x['country']}, rule {x.get('rule')}, "
                  f"reason {x.get('reason')}")
        for x in rejected:
            print(f"    proxy_protocol_rejected: reason {x.get('reason')}, "
                  f"peer_ip {x.get('peer_ip')}")

    async def edge_tls(self, gw: GatewayProcess, tmp: Path, upstream: FakeUpstream,
                       tracing: bool) -> None:
        print(f"$ gateway run --config {CONFIG} --set tls.cert_file=server.crt "
              "--set tls.key_file=server.key --set tls.client_ca_file=ca.crt"
              + (" --set tracing.enabled=true --set tracing.exporter=none" if tracing else ""))
        print(f"  listening on {gw.url}")
        plain = await self.issue("--reseller", "direct", "--name", "tls-direct",
                                 admin_port=gw.admin_port)
        bound = await self.issue("--reseller", "boundco", "--name", "bound-prod",
                                 admin_port=gw.admin_port)
        verify = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        with_cert = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
        with_cert.load_cert_chain(tmp / "client.crt", tmp / "client.key")
        before = len(upstream.requests)
        for label, key, ctx in (
                ("TLS, unbound reseller (direct), no client cert", plain, verify),
                ("TLS, bound reseller (boundco), no client cert", bound, verify),
                ("mTLS, bound reseller, its client certificate", bound, with_cert)):
            await self.ask(label, key, "192.0.2.10", base_url=gw.url,
                           http_client=anthropic.DefaultAsyncHttpxClient(verify=ctx))
        if tracing:
            seen = [r.headers.get("traceparent") for r in upstream.requests[before:]]
            print(f"  tracing on (exporter none: spans made, not exported): the stand-in "
                  f"received traceparent {seen[-1] if seen else None}")
        else:
            print("  tracing: see the README section \"Tracing\" (pip install "
                  "'gateway[otel]', tracing.enabled: true)")

    async def edge_proxy(self, gw: GatewayProcess) -> None:
        print(f"\n$ gateway run --config {CONFIG} --set client_ip.proxy_protocol=v2 "
              "--set client_ip.proxy_protocol_from=[127.0.0.1/32]   (tls off: both on one "
              "listener is a config error)")
        key = await self.issue("--reseller", "direct", "--name", "behind-nlb",
                               admin_port=gw.admin_port)
        body = json.dumps({"model": "claude-demo-1", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "hi"}]}).encode()
        headers = {"x-api-key": key, "content-type": "application/json"}
        for label, head in (
                ("raw socket: PROXY v2 header naming 198.51.100.5 (CN), then the request",
                 proxy_v2_header("198.51.100.5", 51000, "127.0.0.1", gw.port)),
                ("raw socket: a malformed PROXY v2 header (version 3)",
                 proxy_v2_header("198.51.100.5", 51000, "127.0.0.1", gw.port, version=3))):
            await self.raw(label, "POST", "/v1/messages", headers, body, port=gw.port,
                           prefix=head)
        # the request line reaches the log as the request ends: wait for it
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            events = {x.get("event") for x in gw.logs}
            if {"request", "proxy_protocol_rejected"} <= events:
                break
            await asyncio.sleep(0.1)

    def screening_page(self) -> None:
        _h("11. The screening page")
        print(f"  http://<admin_listen>/admin/ui (this demo's gateway had it at "
              f"http://127.0.0.1:{self.admin_port}/admin/ui):\n  the read-only reseller "
              "report in a browser; it asks for the admin token ($GATEWAY_ADMIN_TOKEN) and "
              "keeps it\n  in the tab's memory only (README \"The screening page\")")

    def print_logs(self) -> None:
        _h("9. What the gateway logged: one JSON line per request (and audit events)")
        reqs = [x for x in self.logs if x.get("event") == "request"]
        print(f"{'status':<7}{'decision':<13}{'client_ip':<16}{'cc':<4}{'anon':<13}"
              f"{'reseller':<9}{'cust_cc':<8}{'reason / rule':<40}shadow")
        for x in reqs:
            why = x.get("reason") or x.get("rule") or ""
            print(f"{x['status']!s:<7}{x['decision']:<13}{x['client_ip']!s:<16}"
                  f"{x['country'] or '-':<4}{','.join(x['anonymizer']) or '-':<13}"
                  f"{x['reseller'] or '-':<9}{x['customer_country'] or '-':<8}{why:<40}"
                  f"{','.join(x['shadow']) or ''}")
        audits = [x for x in self.logs if x.get("event") == "audit"]
        print(f"\naudit events: {', '.join(a['action'] + ' ' + a['target'] for a in audits)}")
        if reqs:
            print("\none request line in full:")
            print(json.dumps(reqs[1] if len(reqs) > 1 else reqs[0], indent=None))
        others = sorted({x["event"] for x in self.logs} - {"request", "audit"})
        print(f"\nother events: {', '.join(others)}")


def relay_mix(egress: str) -> list[tuple[str, str]]:
    """(customer id, customer ip) of a reseller relaying what it should refuse (demo geo
    data: 198.51.100.x restricted regions, 203.0.113.x anonymizers, 192.0.2.x clean)."""
    mix = [(f"cn-{i}", "198.51.100.2") for i in range(3)] + [("kp-1", "198.51.100.50")]
    mix += [("vpn-1", "203.0.113.2"), ("tor-1", "203.0.113.18")]
    mix += [(f"shared-{i}", "192.0.2.35") for i in range(12)]
    mix += [("priv-1", "10.0.0.5"), ("self-1", egress)]
    mix += [("hopper", ip) for ip in ("192.0.2.3", "192.0.2.18", "192.0.2.36", "192.0.2.51",
                                      "192.0.2.67")]
    return mix


class GatewayProcess:
    """One `gateway run` process on its own ports (the demo's gateway, and the edge section's
    TLS and PROXY gateways), its JSON log lines collected."""

    def __init__(self, env: dict[str, str], upstream_url: str, port: int | None = None,
                 admin_port: int | None = None) -> None:
        self.port = port or _free_port()
        self.admin_port = admin_port or _free_port()
        self.env = env
        self.upstream_url = upstream_url
        self.logs: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.sets: list[str] = []

    @property
    def url(self) -> str:
        tls = any(x.startswith("tls.") for x in self.sets)
        return f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    async def start(self, sets: list[str]) -> str:
        """Start with these `--set` overrides (after the ports and upstream) and wait until
        /readyz answers 200; its body."""
        self.sets = sets
        args = [f"upstream.url={self.upstream_url}", f"listen=127.0.0.1:{self.port}",
                f"admin_listen=127.0.0.1:{self.admin_port}", *sets]
        cmd = [sys.executable, "-m", "gateway", "run", "--config", CONFIG]
        for a in args:
            cmd += ["--set", a]
        self.proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=REPO, env=self.env, stdout=asyncio.subprocess.PIPE)
        self._reader = asyncio.create_task(self._read_logs())
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 30
            while True:
                try:
                    async with s.get(f"http://127.0.0.1:{self.admin_port}/readyz") as r:
                        if r.status == 200:
                            return await r.text()
                except aiohttp.ClientError:
                    pass
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    raise SystemExit(f"the gateway ({' '.join(sets)}) did not become ready")
                await asyncio.sleep(0.1)

    async def _read_logs(self) -> None:
        assert self.proc and self.proc.stdout
        async for raw in self.proc.stdout:
            try:
                self.logs.append(json.loads(raw))
            except ValueError:
                print("  gateway:", raw.decode(errors="replace").rstrip())

    async def stop(self) -> bool:
        """SIGTERM and wait; whether this call stopped a running process."""
        stopped = False
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 30)
            stopped = True
        if self._reader:
            await self._reader
        return stopped


def demo_pki(folder: Path) -> dict[str, str]:
    """A throwaway CA (tools/pki.py) in `folder` as ca.crt, a server certificate for
    127.0.0.1 (server.crt/.key) and a client certificate (client.crt/.key) it signed; returns
    the client certificate's SHA-256 (of the DER, lowercase hex) as `client_sha256`."""
    ca = CertificateAuthority(folder, "ca")
    ca.issue("server")
    return {"client_sha256": ca.issue("client", server=False).sha256}


def proxy_v2_header(src: str, src_port: int, dst: str, dst_port: int, *,
                    version: int = 2) -> bytes:
    """A PROXY protocol v2 header (command PROXY, TCP over IPv4), as a load balancer sends
    it before the connection's first byte; `version` other than 2 makes it malformed."""
    head = bytearray(v2_header(src, dst, src_port, dst_port))
    head[12] = (version << 4) | 0x1  # the version/command byte after the 12-byte signature
    return bytes(head)


def tracing_available() -> bool:
    """Whether the `otel` extra is installed (`make demo` installs it with the dev extra)."""
    try:
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


def run_demo() -> int:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    asyncio.run(Demo().run())
    return 0
