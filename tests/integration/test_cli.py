"""The `gateway` command as an operator uses it: which secrets each command needs, key
validation and `keys update`, `explain --key-id`, help, version, exit codes, ISO times and
`--json` output; run as real subprocesses against real gateways and a real redis-server."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway import __version__
from gateway.cli import admin_operations
from gateway.store.base import Tally, UsageKey
from tests.support.cli import GatewayProcess, cli_env, code_of, run_cli, send
from tests.support.gateway import (
    DEFAULT_POLICY,
    RunningGateway,
    poll,
    running_gateway,
    write_config,
)
from tests.support.redis_server import RedisServer, free_port
from tests.support.upstream import FakeUpstream

FLEET_S = 1.0
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def _store(server: RedisServer) -> dict[str, Any]:
    return {"url": server.url, "key_prefix": "cli:", "sync_interval_s": 0.2}


def _env_without(*names: str) -> dict[str, str]:
    env = cli_env()
    for n in names:
        env.pop(n, None)
    return env


async def _cli(*args: str, config: Path | None, env: dict[str, str] | None = None
               ) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(run_cli, *args, config=config, env=env)


async def _status(gw: RunningGateway, key: str, path: str = "/v1/messages",
                  body: dict[str, Any] | None = None) -> tuple[int, str | None]:
    status, got, _ = await send(gw.url, key, path=path, body=body)
    return status, code_of(got)


async def test_admin_commands_need_no_upstream_secret(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """On Redis, keys/policy/audit/explain/geo commands run with neither UPSTREAM_API_KEY nor
    the admin token; only `run` needs the upstream secret."""
    cfg = tmp_path / "gateway.yaml"
    bare = _env_without("UPSTREAM_API_KEY", "GATEWAY_ADMIN_TOKEN")
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        issued = await _cli("keys", "issue", "--reseller", "direct", "--json", config=cfg,
                            env=bare)
        assert issued.returncode == 0, issued.stderr
        key = json.loads(issued.stdout)
        results = await asyncio.gather(
            _cli("keys", "list", "--json", config=cfg, env=bare),
            _cli("keys", "show", key["key_id"], config=cfg, env=bare),
            _cli("policy", "show", "--json", config=cfg, env=bare),
            _cli("audit", "list", "--json", config=cfg, env=bare),
            _cli("geo", "lookup", "192.0.2.1", "--json", config=cfg, env=bare),
            _cli("explain", "--ip", "192.0.2.1", "--key-id", key["key_id"], "--json",
                 config=cfg, env=bare))
        for out in results:
            assert out.returncode == 0, (out.args, out.stderr)
        assert json.loads(results[5].stdout)["decision"]["decision"] == "allow"
        assert await _status(gw, key["key"]) == (200, None)

    run = await _cli("run", config=cfg, env=_env_without("UPSTREAM_API_KEY"))
    assert run.returncode == 2
    assert "upstream.api_key_env" in run.stderr and "UPSTREAM_API_KEY" in run.stderr


async def test_embedded_store_commands_need_the_admin_token(tmp_path: Path,
                                                            upstream: FakeUpstream) -> None:
    """On the embedded store the CLI talks to the admin API: without the admin token it says
    which variable to set and exits 2; with it (and no upstream secret) it works."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url,
                               admin_listen=f"127.0.0.1:{free_port()}") as gw:
        refused = await _cli("keys", "list", config=cfg,
                             env=_env_without("GATEWAY_ADMIN_TOKEN", "UPSTREAM_API_KEY"))
        assert refused.returncode == 2
        assert "GATEWAY_ADMIN_TOKEN" in refused.stderr and "admin API" in refused.stderr
        assert "Traceback" not in refused.stderr
        ok = await _cli("keys", "list", "--json", config=cfg,
                        env=_env_without("UPSTREAM_API_KEY"))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == []
        # keys update through the admin API: applied at once; a refused value exits 2.
        key_id, key = await gw.issue_key("direct")
        updated, refused_glob = await asyncio.gather(
            _cli("keys", "update", key_id, "--paths", "/v1/complete", "--json", config=cfg,
                 env=_env_without("UPSTREAM_API_KEY")),
            _cli("keys", "update", key_id, "--models", "x[", config=cfg,
                 env=_env_without("UPSTREAM_API_KEY")))
        assert updated.returncode == 0, updated.stderr
        assert json.loads(updated.stdout)["paths"] == ["/v1/complete"]
        assert await _status(gw, key) == (403, "path_not_allowed")
        assert refused_glob.returncode == 2 and "unbalanced '['" in refused_glob.stderr


async def test_keys_issue_refuses_unknown_reseller_past_expiry_and_bad_globs(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """`keys issue` (CLI: exit 2) and POST /admin/keys (400) refuse a reseller the live policy
    does not know, an expiry in the past and an unbalanced '[' in model or path globs."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        cases: list[tuple[list[str], dict[str, Any], str]] = [
            (["--reseller", "nobody"], {"reseller": "nobody"}, "nobody"),
            (["--reseller", "direct", "--expires", "2020-01-01T00:00:00Z"],
             {"reseller": "direct", "expires_at": time.time() - 60}, "past"),
            (["--reseller", "direct", "--models", "claude-[abc"],
             {"reseller": "direct", "models": ["claude-[abc"]}, "["),
            (["--reseller", "direct", "--models", "["],
             {"reseller": "direct", "models": ["["]}, "["),
            (["--reseller", "direct", "--paths", "/v1/messages["],
             {"reseller": "direct", "paths": ["/v1/messages["]}, "["),
        ]
        outs = await asyncio.gather(*(_cli("keys", "issue", *args, config=cfg)
                                      for args, _, _ in cases))
        for (args, spec, word), out in zip(cases, outs, strict=True):
            assert out.returncode == 2, (args, out.stderr)
            assert word in out.stderr and out.stderr.startswith("error: "), out.stderr
            assert out.stdout == ""
            status, body = await gw.admin("POST", "/admin/keys", json=spec)
            assert status == 400, (spec, body)
            assert word in body["error"]["message"]
        status, listed = await gw.admin("GET", "/admin/keys")
        assert status == 200 and listed["keys"] == []
        ok = await _cli("keys", "issue", "--reseller", "direct", "--models", "claude-[st]*",
                        "--expires", "1d", "--json", config=cfg)
        assert ok.returncode == 0, ok.stderr


async def test_keys_update_reaches_every_instance_within_a_second(
        tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer) -> None:
    """`gateway keys update` (on Redis) and PATCH /admin/keys/{id} change a key's scopes and
    limits on every instance within a second, are audited as key_updated with the changed
    fields, and are validated like issue (exit 2 / 400; unknown key exit 1 / 404)."""
    store = _store(redis_server)
    cfg = tmp_path / "a" / "gateway.yaml"
    async with running_gateway(tmp_path / "a", upstream.url, store=store) as gw1, \
            running_gateway(tmp_path / "b", upstream.url, store=store) as gw2:
        key_id, key = await gw1.issue_key("direct")
        for gw in (gw1, gw2):
            await poll(lambda gw=gw: _ok(gw, key), timeout=FLEET_S)

        t0 = time.monotonic()
        out = await _cli("keys", "update", key_id, "--models", "gpt-*", "--rpm", "7",
                         "--json", config=cfg)
        assert out.returncode == 0, out.stderr
        shown = json.loads(out.stdout)
        assert shown["models"] == ["gpt-*"] and shown["limits"]["rpm"] == 7
        for gw in (gw1, gw2):
            await poll(lambda gw=gw: _refused_model(gw, key),
                       timeout=FLEET_S - (time.monotonic() - t0) + 0.5)
        audit = [json.loads(x) for x in out.stderr.splitlines() if x.startswith("{")]
        assert [(a["action"], a["target"]) for a in audit] == [("key_updated", key_id)]
        assert sorted(audit[0]["fields"]) == ["models", "rpm"]
        assert audit[0]["changes"]["rpm"] == {"from": None, "to": 7}

        # The admin API: widen the models again, set an expiry.
        expires = time.time() + 3600
        status, body = await gw1.admin("PATCH", f"/admin/keys/{key_id}",
                                       json={"models": None, "expires_at": expires})
        assert status == 200, body
        assert body["models"] == [] and body["expires_at"] == expires
        assert ISO.match(body["expires_at_iso"])
        for gw in (gw1, gw2):
            await poll(lambda gw=gw: _ok(gw, key), timeout=FLEET_S + 0.5)
        events = await _cli("audit", "list", "--json", config=cfg)
        updated = [e for e in json.loads(events.stdout)["events"]
                   if e["action"] == "key_updated"]
        assert [sorted(e["fields"]) for e in updated] == [["models", "rpm"],
                                                          ["expires_at", "models"]]

        bad = await asyncio.gather(
            _cli("keys", "update", key_id, "--models", "[", config=cfg),
            _cli("keys", "update", key_id, "--expires", "2020-01-01", config=cfg),
            _cli("keys", "update", key_id, config=cfg),
            _cli("keys", "update", "0000000000000000", "--rpm", "1", config=cfg))
        assert [b.returncode for b in bad] == [2, 2, 2, 1], [b.stderr for b in bad]
        for status_body in await asyncio.gather(
                gw1.admin("PATCH", f"/admin/keys/{key_id}", json={"paths": ["["]}),
                gw1.admin("PATCH", f"/admin/keys/{key_id}", json={"reseller": "acme"}),
                gw1.admin("PATCH", f"/admin/keys/{key_id}",
                          json={"expires_at": time.time() - 1})):
            assert status_body[0] == 400, status_body
        status, _ = await gw1.admin("PATCH", "/admin/keys/0000000000000000", json={"rpm": 1})
        assert status == 404
        assert await _status(gw1, key) == (200, None)


async def _ok(gw: RunningGateway, key: str) -> bool:
    return await _status(gw, key) == (200, None)


async def _refused_model(gw: RunningGateway, key: str) -> bool:
    return await _status(gw, key) == (403, "model_not_allowed")


async def test_explain_takes_a_key_id(tmp_path: Path, upstream: FakeUpstream,
                                      redis_server: RedisServer) -> None:
    """`gateway explain --key-id` judges the key's scopes without its secret, on Redis (CLI)
    and through GET /admin/explain?key_id=; a revoked key is reported as such."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        key_id, _ = await gw.issue_key("direct", models=["claude-*"])
        allowed, refused = await asyncio.gather(
            _cli("explain", "--ip", "192.0.2.1", "--key-id", key_id, "--model", "claude-x",
                 "--json", config=cfg),
            _cli("explain", "--ip", "192.0.2.1", "--key-id", key_id, "--model", "gpt-4",
                 "--json", config=cfg))
        assert allowed.returncode == 0, allowed.stderr
        assert json.loads(allowed.stdout)["request"]["key_id"] == key_id
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["decision"]["code"] == "model_not_allowed"
        status, body = await gw.admin(
            "GET", f"/admin/explain?ip=192.0.2.1&key_id={key_id}&model=gpt-4")
        assert status == 200 and body["decision"]["code"] == "model_not_allowed"
        await gw.admin("POST", f"/admin/keys/{key_id}/revoke")
        out = await _cli("explain", "--ip", "192.0.2.1", "--key-id", key_id, config=cfg)
        assert out.returncode == 1 and "key_revoked" in out.stdout
        unknown = await _cli("explain", "--ip", "192.0.2.1", "--key-id", "0" * 16,
                             "--json", config=cfg)
        assert json.loads(unknown.stdout)["decision"]["code"] == "invalid_api_key"


def _subcommands(help_text: str) -> list[str]:
    """The subcommand names of an argparse help text's {a,b,c} choice list."""
    m = re.search(r"\{([a-z,-]+)\}", help_text)
    assert m, help_text
    return m.group(1).split(",")


async def test_version_help_and_help_lines() -> None:
    """`gateway --version` prints the version; a bare `gateway` (or `gateway keys`) prints its
    help and exits 2; every subcommand shows a help line in its group's help."""
    version, bare, keys = await asyncio.gather(
        _cli("--version", config=None), _cli(config=None), _cli("keys", config=None))
    assert version.returncode == 0 and __version__ in version.stdout
    assert bare.returncode == 2 and "usage: gateway" in bare.stderr
    assert "keys" in bare.stderr and "explain" in bare.stderr
    assert keys.returncode == 2 and "usage: gateway keys" in keys.stderr

    top = await _cli("--help", config=None)
    groups = _subcommands(top.stdout)
    assert {"run", "keys", "policy", "audit", "explain", "geo"} <= set(groups)
    helps = {"": top.stdout}
    for g in ("keys", "policy", "audit", "geo"):
        helps[g] = (await _cli(g, "--help", config=None)).stdout
    for group, text in helps.items():
        for name in _subcommands(text):
            line = re.search(rf"^\s+{re.escape(name)}\s+(\S.*)$", text, re.M)
            assert line, f"`gateway {group} {name}` has no help line:\n{text}"
    assert "update" in _subcommands(helps["keys"])


async def test_keys_show_list_times_and_json(tmp_path: Path, upstream: FakeUpstream,
                                             redis_server: RedisServer) -> None:
    """`keys show` prints for people (ISO times) and JSON with --json; JSON keeps numeric
    times and adds `<field>_iso`; tables print ISO 8601; `audit list --json` too."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)) as gw:
        key_id, _ = await gw.issue_key("direct", name="ci", expires_at=time.time() + 86400)
        human, as_json, table, audit = await asyncio.gather(
            _cli("keys", "show", key_id, config=cfg),
            _cli("keys", "show", key_id, "--json", config=cfg),
            _cli("keys", "list", config=cfg),
            _cli("audit", "list", "--json", config=cfg))
        assert human.returncode == 0, human.stderr
        with_pytest_raises_json(human.stdout)
        assert f"key_id:      {key_id}" in human.stdout
        created = re.search(r"created:\s+(\S+)", human.stdout)
        assert created and ISO.match(created.group(1))
        doc = json.loads(as_json.stdout)
        assert isinstance(doc["created_at"], float)
        assert ISO.match(doc["created_at_iso"]) and ISO.match(doc["expires_at_iso"])
        assert datetime.fromisoformat(doc["expires_at_iso"]).timestamp() == int(
            doc["expires_at"])
        row = [line for line in table.stdout.splitlines() if line.startswith(key_id)]
        assert row and ISO.match(row[0].split()[-1]), table.stdout
        events = json.loads(audit.stdout)["events"]
        assert events and all(ISO.match(e["time_iso"]) for e in events)
        status, api = await gw.admin("GET", f"/admin/keys/{key_id}")
        assert status == 200 and api["created_at_iso"] == doc["created_at_iso"]


def with_pytest_raises_json(text: str) -> None:
    """`text` is not a JSON document."""
    try:
        json.loads(text)
    except ValueError:
        return
    raise AssertionError(f"expected text for people, got JSON: {text[:80]}")


async def test_policy_apply_dry_run_exit_codes(tmp_path: Path, upstream: FakeUpstream,
                                               redis_server: RedisServer) -> None:
    """`policy apply --dry-run` exits 1 when the file differs from the live policy and 0 when
    it is equal; `--json` prints one document saying so; usage errors exit 2."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, store=_store(redis_server)):
        same = tmp_path / "same.yaml"
        same.write_text(yaml.safe_dump(DEFAULT_POLICY))
        changed = copy.deepcopy(DEFAULT_POLICY)
        changed["default_action"] = "deny"
        other = tmp_path / "other.yaml"
        other.write_text(yaml.safe_dump(changed))
        eq, diff, diff_json, usage = await asyncio.gather(
            _cli("policy", "apply", str(same), "--dry-run", config=cfg),
            _cli("policy", "apply", str(other), "--dry-run", config=cfg),
            _cli("policy", "apply", str(other), "--dry-run", "--json", config=cfg),
            _cli("policy", "apply", config=cfg))
        assert eq.returncode == 0, eq.stderr
        assert diff.returncode == 1 and "+default_action: deny" in diff.stdout
        assert diff_json.returncode == 1
        doc = json.loads(diff_json.stdout)
        assert doc["changed"] is True and doc["applied"] is False
        assert doc["live_version"] == 1 and "default_action" in doc["diff"]
        assert usage.returncode == 2


async def test_rate_limit_headers_follow_the_api_family(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    """With `limits_headers: auto` (the default) an Anthropic path gets Anthropic's rate-limit
    headers only and an OpenAI path OpenAI's only; `openai` forces OpenAI's everywhere."""
    chat = {"model": "gpt-test-1", "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}]}
    async with running_gateway(tmp_path / "auto", upstream.url) as gw:
        _, key = await gw.issue_key("direct")
        _, _, ant = await send(gw.url, key)
        _, _, oai = await send(gw.url, key, path="/v1/chat/completions", body=chat)
    assert "anthropic-ratelimit-requests-limit" in ant
    assert not any(h.lower().startswith("x-ratelimit") for h in ant)
    assert "x-ratelimit-limit-requests" in oai
    assert not any(h.lower().startswith("anthropic-ratelimit") for h in oai)
    async with running_gateway(tmp_path / "openai", upstream.url,
                               limits_headers="openai") as gw:
        _, key = await gw.issue_key("direct")
        _, _, forced = await send(gw.url, key)
    assert "x-ratelimit-limit-requests" in forced
    assert not any(h.lower().startswith("anthropic-ratelimit") for h in forced)


async def test_no_server_version_on_the_public_port(tmp_path: Path,
                                                    upstream: FakeUpstream) -> None:
    """No response of the proxy or admin listener names aiohttp or Python in `Server`:
    errors, admitted (streamed) responses and aiohttp's own 400 for a malformed request."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        _, key = await gw.issue_key("direct")
        seen = []
        for k in (None, key):
            _, _, headers = await send(gw.url, k)
            seen.append(headers.get("Server", ""))
        stream = {**{"model": "claude-test-1", "max_tokens": 5, "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]}}
        status, _, headers = await send(gw.url, key, body=stream)
        assert status == 200
        seen.append(headers.get("Server", ""))
        for port in (gw.service.proxy_port, gw.service.admin_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(65536), 10)
            writer.close()
            assert raw.startswith(b"HTTP/1.") and b" 400 " in raw.split(b"\r\n")[0]
            head = raw.split(b"\r\n\r\n")[0].decode("latin-1")
            seen.extend(x.split(":", 1)[1].strip() for x in head.split("\r\n")[1:]
                        if x.lower().startswith("server:"))
    assert len(seen) >= 3
    for value in seen:
        assert "aiohttp" not in value.lower() and "python" not in value.lower(), value


async def test_every_log_line_names_its_worker(tmp_path: Path, upstream: FakeUpstream,
                                               redis_server: RedisServer) -> None:
    """Without --workers every log line (request, audit, diagnostics) carries `worker: null`;
    under `gateway run --workers 2` each worker's lines carry its number (0 or 1)."""
    async with running_gateway(tmp_path / "one", upstream.url) as gw:
        _, key = await gw.issue_key("direct")
        assert await _status(gw, key) == (200, None)
        lines = list(gw.logs.lines)
    assert {x["event"] for x in lines} >= {"request", "audit", "gateway_started"}
    assert all("worker" in x and x["worker"] is None for x in lines), [
        x for x in lines if x.get("worker", 0) is not None]

    port = free_port()
    (tmp_path / "two").mkdir()
    config = write_config(tmp_path / "two", upstream.url, listen=f"127.0.0.1:{port}",
                          admin_listen=f"127.0.0.1:{free_port()}", store=_store(redis_server))
    with GatewayProcess(config, "--workers", "2") as proc:
        started = await poll(lambda: proc.events("gateway_started")
                             if len(proc.events("gateway_started")) == 2 else None, timeout=60)
        assert sorted(x["worker"] for x in started) == [0, 1]
        issued = await _cli("keys", "issue", "--reseller", "direct", "--json", config=config)
        key = json.loads(issued.stdout)["key"]

        async def served() -> bool:
            return (await send(f"http://127.0.0.1:{port}", key))[0] == 200

        await poll(served, timeout=30)
        requests = await poll(lambda: proc.events("request"), timeout=10)
        assert all(x["worker"] in (0, 1) for x in requests)
    assert all("worker" in x for x in proc.lines)


def _seed_ledger(today: str, old: str) -> dict[UsageKey, Tally]:
    return {UsageKey(today, "acme", "ka", "c1", "claude-x"): Tally(2, 20, 200),
            UsageKey(today, "acme", "kb", None, "gpt-4"): Tally(1, 10, 100),
            UsageKey(today, "direct", "kd", "c1", "claude-x"): Tally(4, 40, 400),
            UsageKey(old, "acme", "ka", "c1", "claude-x"): Tally(8, 80, 800)}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_usage_prints_a_table_json_and_csv(
        request: pytest.FixtureRequest, tmp_path: Path, upstream: FakeUpstream,
        kind: str) -> None:
    """`gateway usage` (on Redis directly; on the embedded store through the admin API) prints
    a table with a TOTAL line by default, exactly one JSON document with --json (every row
    with all eight fields) and CSV with --csv, for the filters, --since and --by given; a
    bad option exits 2."""
    store = {"admin_listen": f"127.0.0.1:{free_port()}"} if kind == "memory" else {
        "store": _store(request.getfixturevalue("redis_server"))}
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, **store) as gw:
        today = datetime.now(UTC).strftime("%Y-%m-%d")
        old = datetime.fromtimestamp(time.time() - 30 * 86400, UTC).strftime("%Y-%m-%d")
        await gw.service.store.add_usage(_seed_ledger(today, old), 400)
        table, as_json, as_csv, by_model, since_old, bad = await asyncio.gather(
            _cli("usage", "--by", "customer", config=cfg),
            _cli("usage", "--json", config=cfg),
            _cli("usage", "--csv", "--reseller", "acme", "--by", "day", "--since",
                 "60d", config=cfg),
            _cli("usage", "--key", "ka", "--by", "model", "--since", old, "--json",
                 config=cfg),
            _cli("usage", "--since", old, "--customer", "c1", "--by", "day",
                 config=cfg),
            _cli("usage", "--since", "last week", config=cfg))
    for out in (table, as_json, as_csv, by_model, since_old):
        assert out.returncode == 0, (out.args, out.stderr)
    assert table.stdout.splitlines()[1:] == [
        "RESELLER  CUSTOMER  REQUESTS  INPUT_TOKENS  OUTPUT_TOKENS",
        "acme      -                1            10            100",
        "acme      c1               2            20            200",
        "direct    c1               4            40            400",
        "TOTAL                      7            70            700"]
    doc = json.loads(as_json.stdout)
    assert doc["totals"] == {"requests": 7, "input_tokens": 70, "output_tokens": 700}
    assert [list(r) for r in doc["rows"]] == [[
        "day", "reseller", "key_id", "customer_id", "model", "requests", "input_tokens",
        "output_tokens"]] * 3
    assert {(r["key_id"], r["customer_id"], r["model"]) for r in doc["rows"]} == {
        ("ka", "c1", "claude-x"), ("kb", None, "gpt-4"), ("kd", "c1", "claude-x")}
    assert as_csv.stdout.splitlines() == [
        "day,reseller,key_id,customer_id,model,requests,input_tokens,output_tokens",
        f"{old},acme,,,,8,80,800", f"{today},acme,,,,3,30,300"]
    assert json.loads(by_model.stdout)["rows"] == [{
        "day": None, "reseller": "acme", "key_id": "ka", "customer_id": None,
        "model": "claude-x", "requests": 10, "input_tokens": 100, "output_tokens": 1000}]
    assert since_old.stdout.splitlines()[0] == f"usage {old} to {today} (UTC days)"
    assert [line.split()[:3] for line in since_old.stdout.splitlines()[2:]] == [
        [old, "c1", "8"], [today, "c1", "6"], ["TOTAL", "14", "140"]]
    assert bad.returncode == 2 and "since 'last week'" in bad.stderr


async def test_keys_quota_option_sets_shows_and_clears(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    """`keys issue|update --quota` sets a key's own quotas (repeatable), `keys show` and
    `keys list` print them, an empty value removes one, the change is audited; a bad quota
    exits 2 naming it."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url, admin_listen=f"127.0.0.1:{free_port()}"):
        issued = await _cli("keys", "issue", "--reseller", "direct", "--quota",
                            "daily.output_tokens=500", "--quota", "monthly.requests=9",
                            "--json", config=cfg)
        assert issued.returncode == 0, issued.stderr
        key_id = json.loads(issued.stdout)["key_id"]
        shown = await _cli("keys", "show", key_id, config=cfg)
        assert "quotas:      daily.output_tokens=500 monthly.requests=9" in shown.stdout
        updated = await _cli("keys", "update", key_id, "--quota", "daily.output_tokens=",
                             "--quota", "daily.requests=3", "--json", config=cfg)
        assert updated.returncode == 0, updated.stderr
        assert json.loads(updated.stdout)["quotas"] == {"daily.requests": 3,
                                                        "monthly.requests": 9}
        listed = await _cli("keys", "list", config=cfg)
        assert listed.stdout.splitlines()[1].split()[-2:] == [
            "daily.requests=3,monthly.requests=9", "-"]
        events = json.loads((await _cli("audit", "list", "--json", config=cfg)).stdout)
        assert events["events"][-1]["changes"]["quotas"] == {
            "from": {"daily.output_tokens": 500, "monthly.requests": 9},
            "to": {"daily.requests": 3, "monthly.requests": 9}}
        bad = await asyncio.gather(
            _cli("keys", "update", key_id, "--quota", "weekly.requests=1", config=cfg),
            _cli("keys", "issue", "--reseller", "direct", "--quota", "daily.requests=-2",
                 config=cfg))
        assert [b.returncode for b in bad] == [2, 2]
        assert "unknown period 'weekly'" in bad[0].stderr
        assert "quotas.daily.requests" in bad[1].stderr


async def test_usage_counts_forwarded_requests_never_refused_ones(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """End to end on the embedded store: a key issued with `--quota daily.requests=2` gets
    two answers and a 429 daily_quota_exceeded with retry-after; once the instance has
    flushed, `gateway usage` counts the two forwarded requests with the tokens their request
    lines report, and never the refused one."""
    cfg = tmp_path / "gateway.yaml"
    async with running_gateway(tmp_path, upstream.url,
                               admin_listen=f"127.0.0.1:{free_port()}") as gw:
        issued = await _cli("keys", "issue", "--reseller", "direct", "--quota",
                            "daily.requests=2", "--json", config=cfg)
        assert issued.returncode == 0, issued.stderr
        key_id, key = json.loads(issued.stdout)["key_id"], json.loads(issued.stdout)["key"]
        answers = [await send(gw.url, key) for _ in range(3)]
        assert [(status, code_of(body)) for status, body, _ in answers] == [
            (200, None), (200, None), (429, "daily_quota_exceeded")]
        assert int(answers[2][2]["retry-after"]) >= 1
        lines = [x for x in gw.logs.requests() if x["key_id"] == key_id]
        forwarded = [x for x in lines if x["status"] == 200]
        assert len(forwarded) == 2 and len(lines) == 3

        async def flushed() -> dict[str, Any] | None:
            out = await _cli("usage", "--key", key_id, "--json", config=cfg)
            assert out.returncode == 0, out.stderr
            doc: dict[str, Any] = json.loads(out.stdout)
            return doc if doc["totals"]["requests"] >= 2 else None  # both flushed

        doc = await poll(flushed, timeout=15, interval=0.2)
    assert doc["totals"] == {
        "requests": 2,
        "input_tokens": sum(x["input_tokens"] for x in forwarded),
        "output_tokens": sum(x["output_tokens"] for x in forwarded)}
    assert [(r["reseller"], r["key_id"], r["customer_id"], r["model"]) for r in doc["rows"]] \
        == [("direct", key_id, None, "claude-test-1")]


@pytest.mark.parametrize("wildcard", ["0.0.0.0", "[::]"])
async def test_the_cli_reaches_an_admin_listener_on_a_wildcard_address(
        tmp_path: Path, upstream: FakeUpstream, wildcard: str) -> None:
    """A gateway whose admin listener is bound on a wildcard address (IPv4 or IPv6) is called
    by the CLI's admin operations on loopback of that family, and answers."""
    listen = f"{wildcard}:{free_port()}"
    async with running_gateway(tmp_path, upstream.url, admin_listen=listen) as gw:
        ops = admin_operations(gw.service.config)
        issued = await ops.issue_key({"reseller": "direct", "name": "wild"})
        assert [k["key_id"] for k in await ops.list_keys()] == [issued.key_id]
