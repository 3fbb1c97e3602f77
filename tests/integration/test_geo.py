"""Geo end to end with MaxMind's own test databases: the located client in the request log
line, forged forwarding headers from untrusted peers, hot replacement of a database file (and
refusal of a corrupt one), `gateway geo lookup`, policies needing a database the config lacks,
old databases in /readyz and the metrics, and a database file deleted while serving."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp

from gateway.policy import canonical, validate_policy
from tests.support.cli import TEST_GEO, GatewayProcess, cli, gateway_process, run_cli, send
from tests.support.gateway import REPO, poll, running_gateway, write_config
from tests.support.upstream import FakeUpstream

ALL_FLAGS = {"vpn", "tor", "public_proxy", "residential_proxy", "hosting"}
#: No rules, a reseller without a country list: every located request is served and logged.
OPEN_POLICY: dict[str, Any] = {"version": 1, "default_action": "allow", "rules": [],
                               "resellers": {"direct": {"status": "active"}}}
DEMO_COUNTRY = REPO / "geo" / "demo" / "Demo-Country.mmdb"
TEST_COUNTRY = TEST_GEO / "GeoIP2-Country-Test.mmdb"


def _maxmind_geo(**extra: Any) -> dict[str, Any]:
    return {"country_db": str(TEST_COUNTRY),
            "asn_db": str(TEST_GEO / "GeoLite2-ASN-Test.mmdb"),
            "anonymous_ip_db": str(TEST_GEO / "GeoIP2-Anonymous-IP-Test.mmdb"), **extra}


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


def _replace_with(path: Path, content: Path | bytes) -> None:
    """Replace `path` by rename, as geoipupdate does."""
    tmp = path.with_suffix(".incoming")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        shutil.copyfile(content, tmp)
    os.replace(tmp, path)


async def test_log_line_locates_client_behind_trusted_proxy(tmp_path: Path,
                                                            upstream: FakeUpstream) -> None:
    """Through a trusted proxy the log line carries the forwarded client's address, country,
    ASN and anonymizer flags from MaxMind's test databases (IPv4 and IPv6)."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, geo=_maxmind_geo()) as gw:
        _, key = await gw.issue_key("direct")
        cases = [
            ("89.160.20.113", "SE", 29518, set()),
            ("81.2.69.160", "GB", None, ALL_FLAGS),
            ("2001:250::1", "CN", None, set()),
            ("214.78.120.1", "US", 721, set()),
            ("1.2.0.1", None, None, {"vpn"}),
        ]
        for ip, country, asn, flags in cases:
            # A chain: the client, then a trusted proxy of ours in front of the gateway.
            status, _, _ = await send(gw.url, key, ip=f"{ip}, 127.0.0.2")
            assert status == 200
            line = gw.logs.requests()[-1]
            assert (line["client_ip"], line["peer_ip"]) == (ip, "127.0.0.1")
            assert (line["country"], line["asn"]) == (country, asn), ip
            assert set(line["anonymizer"]) == flags and isinstance(line["anonymizer"], list)
        assert upstream.requests[0].headers["X-Forwarded-For"] == "89.160.20.113, 127.0.0.2, " \
                                                                  "127.0.0.1"


async def test_forged_forwarding_header_from_untrusted_peer(tmp_path: Path,
                                                            upstream: FakeUpstream) -> None:
    """A peer outside trusted_proxies is located at its own address, whatever X-Forwarded-For
    it sends, and its forged chain is not passed upstream."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, geo=_maxmind_geo(),
                               client_ip={"trusted_proxies": ["10.0.0.0/8"]}) as gw:
        _, key = await gw.issue_key("direct")
        status, _, _ = await send(gw.url, key, ip="89.160.20.113")
        assert status == 200
        line = gw.logs.requests()[-1]
        assert (line["client_ip"], line["peer_ip"]) == ("127.0.0.1", "127.0.0.1")
        assert (line["country"], line["asn"], line["anonymizer"]) == (None, None, [])
        assert upstream.last_request.headers["X-Forwarded-For"] == "127.0.0.1"


async def test_replaced_database_used_without_restart(tmp_path: Path,
                                                      upstream: FakeUpstream) -> None:
    """A country database replaced on disk is picked up while serving; a corrupt replacement is
    refused (geo_database_rejected) and lookups keep using the database already open."""
    live = await asyncio.to_thread(_copy, DEMO_COUNTRY, tmp_path / "geo" / "Country.mmdb")
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               geo={"country_db": str(live)}) as gw:
        _, key = await gw.issue_key("direct")

        async def located(ip: str) -> str | None:
            status, _, _ = await send(gw.url, key, ip=ip)
            assert status == 200
            country: str | None = gw.logs.requests()[-1]["country"]
            return country

        assert await located("192.0.2.1") == "US"  # demo data
        assert await located("89.160.20.113") is None
        demo_epoch = gw.service.geo.build_epochs()["country"]

        await asyncio.to_thread(_replace_with, live, TEST_COUNTRY)
        await poll(lambda: _is(located("89.160.20.113"), "SE"), timeout=10)
        assert await located("192.0.2.1") is None  # not in MaxMind's test data
        loaded = gw.logs.events("geo_database_loaded")[-1]
        assert (loaded["database"], loaded["path"]) == ("country", str(live))
        assert loaded["database_type"] == "GeoIP2-Country"
        new_epoch = gw.service.geo.build_epochs()["country"]
        assert loaded["build_epoch"] == new_epoch != demo_epoch

        await asyncio.to_thread(_replace_with, live, b"\x00not a maxmind db\xff" * 512)
        rejected = await poll(lambda: gw.logs.events("geo_database_rejected"), timeout=10)
        assert rejected[0]["path"] == str(live) and rejected[0]["reason"]
        assert rejected[0]["build_epoch"] == new_epoch
        assert await located("89.160.20.113") == "SE"
        assert gw.service.geo.build_epochs()["country"] == new_epoch
        status, body = await gw.admin("GET", "/readyz")
        assert status == 200, body

        # A later good file is still taken: the refusal did not stop the watcher.
        await asyncio.to_thread(_replace_with, live, DEMO_COUNTRY)
        await poll(lambda: _is(located("192.0.2.1"), "US"), timeout=10)
        assert len(gw.logs.events("geo_database_rejected")) == 1


async def _is(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


def test_geo_lookup_cli(tmp_path: Path) -> None:
    """`gateway geo lookup IP --json` reports what the configured databases say of an address."""
    cfg = write_config(tmp_path, "http://127.0.0.1:9", geo=_maxmind_geo())
    out = run_cli("geo", "lookup", "89.160.20.113", "--json", config=cfg)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert (doc["ip"], doc["country"], doc["registered_country"]) == ("89.160.20.113", "SE", "DE")
    assert (doc["asn"], doc["asn_org"], doc["anonymizer"]) == (29518, "Bredband2 AB", [])
    dbs = doc["databases"]
    assert {k: v["database_type"] for k, v in dbs.items()} == {
        "country": "GeoIP2-Country", "asn": "GeoLite2-ASN",
        "anonymous_ip": "GeoIP2-Anonymous-IP"}
    assert dbs["country"]["found"] and dbs["asn"]["found"]
    assert dbs["country"]["path"] == str(TEST_COUNTRY)

    out = run_cli("geo", "lookup", "81.2.69.160", "--json", config=cfg)
    doc = json.loads(out.stdout)
    assert doc["country"] == "GB" and set(doc["anonymizer"]) == ALL_FLAGS
    assert doc["asn"] is None and not doc["databases"]["asn"]["found"]

    (tmp_path / "demo").mkdir()
    demo = write_config(tmp_path / "demo", "http://127.0.0.1:9")
    out = run_cli("geo", "lookup", "203.0.113.85", "--json", config=demo)
    doc = json.loads(out.stdout)
    assert (doc["country"], doc["registered_country"]) == ("SG", "SG")  # registered fallback
    out = run_cli("geo", "lookup", "203.0.113.35", config=demo)
    assert out.returncode == 0 and "hosting" in out.stdout and "64521" in out.stdout


async def test_database_overwritten_in_place_keeps_serving(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """Database files overwritten in place (garbage, then truncated, then a valid copy) never
    crash a real gateway process nor turn a lookup into a 500: the last good copy keeps
    answering with the right country until the valid file is taken again."""
    geo = {kind: str(await asyncio.to_thread(_copy, src, tmp_path / "geo" / src.name))
           for kind, src in (("country_db", TEST_COUNTRY),
                             ("asn_db", TEST_GEO / "GeoLite2-ASN-Test.mmdb"),
                             ("anonymous_ip_db", TEST_GEO / "GeoIP2-Anonymous-IP-Test.mmdb"))}
    async with gateway_process(tmp_path, upstream.url, OPEN_POLICY,
                               geo={**geo, "reload_interval_s": 0.2}) as gw:
        code, out, err = await run_cli_async(gw, "keys", "issue", "--reseller", "direct",
                                             "--json")
        assert code == 0, err
        key = json.loads(out)["key"]
        fresh = iter(f"214.78.{120 + n // 250}.{1 + n % 250}" for n in range(1000))

        async def check_located(count: int = 5) -> None:
            """Uncached addresses (each used once) answer 200 and are located in the US."""
            for _ in range(count):
                ip = next(fresh)
                status, body, _ = await send(gw.url, key, ip=ip)
                assert status == 200, body
                line = await poll(lambda ip=ip: [x for x in gw.events("request")
                                                  if x["client_ip"] == ip])
                assert line[0]["country"] == "US" and line[0]["asn"] == 721
            assert gw.returncode is None

        def rejected() -> int:
            return len(gw.events("geo_database_rejected"))

        await check_located()
        sizes = {kind: os.path.getsize(path) for kind, path in geo.items()}

        # Garbage over the first bytes of each file, same inode, same size.
        for path in geo.values():
            await asyncio.to_thread(_overwrite, Path(path), b"\xde\xad\xbe\xef" * 4096, False)
        await poll(lambda: rejected() >= 3, timeout=15)
        await check_located()

        # Truncated in place to a few bytes.
        before = rejected()
        for path in geo.values():
            await asyncio.to_thread(_overwrite, Path(path), b"MMDB", True)
        await poll(lambda: rejected() >= before + 3, timeout=15)
        await check_located()
        lines = gw.events("geo_database_rejected")
        assert {x["path"] for x in lines} == set(geo.values())

        # A valid database written back in place (the same inode) is taken again.
        loads = len(gw.events("geo_database_loaded"))
        await asyncio.to_thread(_overwrite, Path(geo["country_db"]), DEMO_COUNTRY, True)
        await poll(lambda: len(gw.events("geo_database_loaded")) > loads, timeout=15)
        status, _, _ = await send(gw.url, key, ip="192.0.2.1")  # demo data: US
        assert status == 200
        line = await poll(lambda: [x for x in gw.events("request")
                                   if x["client_ip"] == "192.0.2.1"])
        assert line[0]["country"] == "US"
        assert not [x for x in gw.events("request") if x["status"] == 500]
        assert sizes  # every database was copied before it was damaged
        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.finish() == 0


def _damaged_copy(src: Path, dst: Path) -> Path:
    """`src` with its data section overwritten (its search tree and metadata intact): it
    opens, and every address it knows fails to decode."""
    import maxminddb

    data = bytearray(src.read_bytes())
    meta = maxminddb.open_database(str(src)).metadata()
    start = meta.node_count * meta.record_size * 2 // 8 + 16  # tree, then 16 zero bytes
    end = data.rfind(b"\xab\xcd\xefMaxMind.com")
    data[start:end] = b"\xff" * (end - start)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(data))
    return dst


def test_geo_lookup_json_stdout_holds_the_answer_alone(tmp_path: Path) -> None:
    """While `gateway geo lookup --json` logs (a damaged record: geo_lookup_failed), stdout is
    the one JSON document and the log line goes to stderr."""
    bad = _damaged_copy(DEMO_COUNTRY, tmp_path / "geo" / "Country.mmdb")
    cfg = write_config(tmp_path, "http://127.0.0.1:9", geo={"country_db": str(bad)})
    out = run_cli("geo", "lookup", "192.0.2.1", "--json", config=cfg)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["country"] is None and not doc["databases"]["country"]["found"]
    failed = [json.loads(x) for x in out.stderr.splitlines() if "geo_lookup_failed" in x]
    assert [x["database"] for x in failed] == ["country"]


def _overwrite(path: Path, content: Path | bytes, truncate: bool) -> None:
    """Write into the existing file (same inode), as `cp` or a careless script does."""
    data = content if isinstance(content, bytes) else content.read_bytes()
    with path.open("r+b") as f:
        f.write(data)
        if truncate:
            f.truncate(len(data))


async def run_cli_async(gw: GatewayProcess, *args: str) -> tuple[int, str, str]:
    return await cli(*args, "--config", str(gw.config), cwd=gw.config.parent)


async def test_sighup_notices_database_overwritten_in_place(tmp_path: Path,
                                                            upstream: FakeUpstream) -> None:
    """With no periodic check due, a reload (SIGHUP) takes a database rewritten in place and
    refuses a truncated one, keeping the copy in service."""
    live = await asyncio.to_thread(_copy, DEMO_COUNTRY, tmp_path / "geo" / "Country.mmdb")
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               geo={"country_db": str(live), "reload_interval_s": 3600}) as gw:
        demo_epoch = gw.service.geo.build_epochs()["country"]
        await asyncio.to_thread(_overwrite, live, TEST_COUNTRY, True)
        assert await gw.service.reload()
        new_epoch = gw.service.geo.build_epochs()["country"]
        assert new_epoch != demo_epoch
        assert gw.service.geo.lookup("89.160.20.113").country == "SE"

        await asyncio.to_thread(_overwrite, live, b"MMDB", True)
        assert await gw.service.reload()
        [rejected] = gw.logs.events("geo_database_rejected")
        assert rejected["path"] == str(live)
        assert gw.service.geo.build_epochs()["country"] == new_epoch
        assert gw.service.geo.lookup("89.160.20.120").country == "SE"  # uncached


#: A policy with a rule on anonymizer flags: it needs geo.anonymous_ip_db.
ANONYMIZER_POLICY: dict[str, Any] = {
    **OPEN_POLICY, "rules": [{"id": "no-vpn", "action": "deny", "reason": "anonymizer_not_allowed",
                              "match": {"anonymizer": ["vpn"]}}]}
NO_OPTIONAL_DBS = {"asn_db": None, "anonymous_ip_db": None}


async def test_policy_needing_a_missing_database_is_refused_live(tmp_path: Path,
                                                                 upstream: FakeUpstream) -> None:
    """Without geo.anonymous_ip_db, a policy with an anonymizer rule is refused by the admin API
    (400, naming the rule) and, written to the store by another writer, is not loaded
    (policy_rejected); the policy in force stays."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY, geo=NO_OPTIONAL_DBS) as gw:
        version = gw.service.policy_version
        assert version is not None and set(gw.service.geo.dbs) == {"country"}
        status, body = await gw.admin("PUT", "/admin/policy", data=json.dumps(ANONYMIZER_POLICY))
        assert status == 400
        assert body["error"]["code"] == "invalid_policy"
        assert body["error"]["errors"] == [{
            "field": "rules[no-vpn].match.anonymizer",
            "reason": "needs geo.anonymous_ip_db, which the gateway config does not set"}]

        doc = canonical(validate_policy(ANONYMIZER_POLICY, "test"))
        stored = await gw.service.store.put_policy(doc, "other-writer", version)
        [rejected] = await poll(lambda: gw.logs.events("policy_rejected"))
        assert rejected["version"] == stored
        assert "rules[no-vpn].match.anonymizer: needs geo.anonymous_ip_db" in rejected["reason"]
        assert gw.service.policy_version == version


async def test_reload_keeps_databases_the_live_policy_needs(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """A SIGHUP config that drops geo.anonymous_ip_db while the live policy has an anonymizer
    rule is refused (config_reload_failed naming the rule); the databases stay open."""
    async with running_gateway(tmp_path, upstream.url, ANONYMIZER_POLICY) as gw:
        write_config(tmp_path, upstream.url, ANONYMIZER_POLICY, geo=NO_OPTIONAL_DBS)
        assert not await gw.service.reload()
        [failed] = gw.logs.events("config_reload_failed")
        assert "rules[no-vpn].match.anonymizer: needs geo.anonymous_ip_db" in failed["reason"]
        assert "anonymous_ip" in gw.service.geo.dbs


async def _metric(gw: Any, name: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(name)}


async def test_old_database_degrades_readiness_and_shows_in_metrics(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Databases built longer ago than geo.max_age_days leave /readyz at 200 with status
    degraded naming geo, each database's build date and age in the body, and
    gateway_geo_database_age_days / _stale in the metrics."""
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               geo={"max_age_days": 30}) as gw:  # the demo data: 2025-11-24
        status, body = await gw.admin("GET", "/readyz")
        assert status == 200
        assert (body["status"], body["degraded"]) == ("degraded", ["geo"])
        country = body["checks"]["geo"]["country"]
        assert country["build_date"] == "2025-11-24T16:00:00Z" and country["stale"] is True
        assert country["age_days"] > 30 and country["database_type"] == "Demo-Country"
        ages = await _metric(gw, "gateway_geo_database_age_days{")
        assert ages['gateway_geo_database_age_days{database="country"}'] > 30
        stale = await _metric(gw, "gateway_geo_database_stale{")
        assert stale == {f'gateway_geo_database_stale{{database="{k}"}}': 1.0
                         for k in ("country", "asn", "anonymous_ip")}
    async with running_gateway(tmp_path / "fresh", upstream.url, OPEN_POLICY) as gw:
        status, body = await gw.admin("GET", "/readyz")
        assert (status, body["status"], body["degraded"]) == (200, "ready", [])
        assert (await _metric(gw, "gateway_geo_database_stale{"))[
            'gateway_geo_database_stale{database="country"}'] == 0.0


async def test_database_deleted_under_a_running_gateway(tmp_path: Path,
                                                        upstream: FakeUpstream) -> None:
    """A database file deleted while serving is noticed by the periodic check and logged once
    (geo_database_missing); lookups keep using the copy in service; /readyz says degraded."""
    live = await asyncio.to_thread(_copy, DEMO_COUNTRY, tmp_path / "geo" / "Country.mmdb")
    async with running_gateway(tmp_path, upstream.url, OPEN_POLICY,
                               geo={"country_db": str(live)}) as gw:
        _, key = await gw.issue_key("direct")
        await asyncio.to_thread(live.unlink)
        [missing] = await poll(lambda: gw.logs.events("geo_database_missing"))
        assert (missing["database"], missing["path"]) == ("country", str(live))
        status, _, _ = await send(gw.url, key, ip="192.0.2.1, 127.0.0.2")
        assert status == 200 and gw.logs.requests()[-1]["country"] == "US"
        status, body = await gw.admin("GET", "/readyz")
        assert (status, body["status"], body["degraded"]) == (200, "degraded", ["geo"])
        assert body["checks"]["geo"]["country"]["missing"] is True
        assert len(gw.logs.events("geo_database_missing")) == 1
