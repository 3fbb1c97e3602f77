"""Reseller screening (gateway/screening.py): the signal computations as pure functions over
bucketed data, the recording of a request, the report's shape and table, and end to end
through a gateway: after a traffic mix the report flags the relaying reseller with its
reasons and not the honest one, the alert line is printed once, and with suspend + enforce
the relaying reseller's keys are refused."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.context import RequestContext
from gateway.errors import OperationError
from gateway.policy import Screening, compile_policy, validate_policy
from gateway.screening import (
    ACTIVITY_MIN_HOURS,
    MEANINGS,
    SIGNALS,
    SPIKE_MIN_DENIALS,
    build_report,
    compute_signals,
    format_report,
    invalid_customer_ip,
    local_hour,
    reseller_report,
    signal_values,
    since_hours,
    state_of,
    tally_request,
)
from gateway.settings import ConfigError
from gateway.store.base import ScreeningTally, ScreeningWindow
from gateway.store.memory import MemoryStore
from tests.support.cli import run_cli
from tests.support.gateway import DEFAULT_POLICY, poll, running_gateway, store_config
from tests.support.redis_server import free_port
from tests.support.upstream import FakeUpstream

H = 500_000  # an hour number (Unix time // 3600)
SEP = "\x1f"


def _window(hours: dict[int, dict[str, int]], **pairs: set[str]) -> ScreeningWindow:
    return ScreeningWindow(hours=hours, customers=3, pairs=dict(pairs))


# --- pure computations ---------------------------------------------------------------------

def test_no_traffic_is_all_zero_and_never_flags() -> None:
    """An empty window gives every signal the value 0 and the state ok."""
    out = compute_signals(ScreeningWindow(), H, 24, Screening())
    assert [s["name"] for s in out] == list(SIGNALS)
    assert all(s["value"] == 0 and s["state"] == "ok" for s in out)


def test_share_signals_are_fractions_of_attested_requests() -> None:
    """restricted, anonymizer and invalid shares divide by attested requests only."""
    w = _window({H: {"req": 20, "att": 10, "rst": 3, "anon": 1, "inv": 2}})
    v = signal_values(w, H, 24)
    assert v["restricted_customer_share"] == 0.3
    assert v["anonymizer_customer_share"] == 0.1
    assert v["invalid_customer_ip_share"] == 0.2


def test_count_signals_report_the_largest_group() -> None:
    """Country hopping, shared customer ip and egress spread are the largest per-subject
    counts of distinct partners."""
    w = _window({H: {"req": 1}},
                cc={f"a{SEP}US", f"a{SEP}CN", f"a{SEP}RU", f"b{SEP}US"},
                ip={f"1.1.1.1{SEP}x{i}" for i in range(7)} | {f"2.2.2.2{SEP}y"},
                kc={f"k1{SEP}US", f"k1{SEP}DE"},
                ka={f"k1{SEP}{n}" for n in range(5)})
    v = signal_values(w, H, 24)
    assert v["customer_country_hopping"] == 3
    assert v["shared_customer_ip"] == 7
    assert v["egress_spread"] == 5


def test_denial_spike_compares_the_current_hour_with_the_hourly_mean() -> None:
    """All of 12 denials in the current hour of a 24 h window is 24 times the mean; below
    SPIKE_MIN_DENIALS it is 0."""
    w = _window({H: {"den": SPIKE_MIN_DENIALS + 2}})
    assert signal_values(w, H, 24)["denial_spike"] == 24.0
    w = _window({H: {"den": SPIKE_MIN_DENIALS - 1}})
    assert signal_values(w, H, 24)["denial_spike"] == 0.0
    w = _window({H - 1: {"den": 12}, H: {"den": 12}})
    assert signal_values(w, H, 2)["denial_spike"] == 1.0


def test_activity_mismatch_needs_traffic_in_several_hours() -> None:
    """Off-hours share counts only once attested traffic was seen in ACTIVITY_MIN_HOURS
    distinct hours."""
    few = _window({H + i: {"lt": 2, "off": 2} for i in range(ACTIVITY_MIN_HOURS - 1)})
    assert signal_values(few, H + 5, 24)["activity_hours_mismatch"] == 0
    many = _window({H + i: {"lt": 4, "off": 3} for i in range(ACTIVITY_MIN_HOURS)})
    assert signal_values(many, H + 5, 24)["activity_hours_mismatch"] == 0.75


def test_states_follow_threshold_and_watch() -> None:
    """flag at or above the threshold, watch at or above watch, ok below; 0 is ok."""
    assert state_of(0.05, 0.05, 0.01) == "flag"
    assert state_of(0.02, 0.05, 0.01) == "watch"
    assert state_of(0.005, 0.05, 0.01) == "ok"
    assert state_of(0.0, 0.05, 0.01) == "ok"


def test_invalid_customer_ips() -> None:
    """Private, loopback, shared, reserved, documentation and the egress address are invalid;
    a global address is not; documentation is valid with the demo databases."""
    for ip in ("10.1.2.3", "127.0.0.1", "100.64.0.1", "240.0.0.1", "0.1.2.3", "fe80::1",
               "192.0.2.10", "2001:db8::1", "224.0.0.1", "::ffff:10.0.0.1", "nonsense"):
        assert invalid_customer_ip(ip, "8.8.8.8"), ip
    assert invalid_customer_ip("8.8.4.4", "8.8.4.4")
    assert not invalid_customer_ip("8.8.4.4", "1.1.1.1")
    assert not invalid_customer_ip("192.0.2.10", "1.1.1.1", documentation_ok=True)


def test_local_hour_uses_the_country_offset_table() -> None:
    """01:30 UTC is 10:30 in JP (+9), 20:30 in US (-5), 07:00 in IN (+5.5); None if unknown."""
    now = 1_764_639_000.0  # 2025-12-02T01:30:00Z
    assert local_hour(now, "JP") == 10
    assert local_hour(now, "US") == 20
    assert local_hour(now, "IN") == 7
    assert local_hour(now, "ZZ") is None


def test_restricted_rules_are_enforced_country_denials() -> None:
    """Only enforced deny rules that match on country count as restricted-region rules."""
    policy = compile_policy(validate_policy(DEFAULT_POLICY, "t"), 1)
    assert policy.restricted_ids == frozenset({"restricted-regions"})


def test_tally_request_counts_a_denied_relay_request() -> None:
    """A denied attested request from a restricted country counts as attested, denied,
    restricted, with its customer country, pairs and hour."""
    ctx = RequestContext("r", "127.0.0.1", "POST", "/v1/messages", 0.0, client_ip="192.0.2.1",
                         country="US", asn=64500, reseller="relay", key_id="k1",
                         customer_id="c1", customer_ip="198.51.100.1", customer_country="CN",
                         decision="deny", rule="restricted-regions",
                         reason="unsupported_country_region_territory")
    t = ScreeningTally()
    tally_request(t, ctx, (), {"restricted-regions"}, 1_764_639_000.0, documentation_ok=True)
    assert {k: t.counts[k] for k in ("req", "den", "att", "rst", "cc:CN", "asn:64500")} == {
        "req": 1, "den": 1, "att": 1, "rst": 1, "cc:CN": 1, "asn:64500": 1}
    assert "inv" not in t.counts and "anon" not in t.counts
    assert t.customers == {"c1"}
    assert t.pairs["cc"] == {f"c1{SEP}CN"} and t.pairs["ip"] == {f"198.51.100.1{SEP}c1"}
    assert t.counts["h:9"] == 1  # 01:30 UTC is 09:30 in CN (+8)


def test_report_entry_shape() -> None:
    """A reseller's entry has the binding fields, top lists ordered, 24 activity hours."""
    w = ScreeningWindow(hours={H: {"req": 5, "den": 1, "cc:US": 3, "cc:CN": 2, "asn:64500": 5,
                                   "h:3": 5}}, customers=2, names={"64500": "Demo Cloud US"})
    r = reseller_report("acme", "active", w, H, 24, Screening())
    assert set(r) == {"reseller", "status", "requests", "denied", "customers", "flagged",
                      "signals", "top_customer_countries", "top_client_asns",
                      "activity_hours"}
    assert r["top_customer_countries"] == [{"country": "US", "requests": 3},
                                           {"country": "CN", "requests": 2}]
    assert r["top_client_asns"] == [{"asn": 64500, "name": "Demo Cloud US", "requests": 5}]
    assert len(r["activity_hours"]) == 24 and r["activity_hours"][3] == 5
    assert all(s["meaning"] == MEANINGS[s["name"]] for s in r["signals"])
    text = format_report({"since": "24h", "generated_at": "x", "resellers": [r]})
    assert "acme" in text and "customer countries: US 3, CN 2" in text


def test_since_and_policy_limits() -> None:
    """since takes whole hours or days; the policy's limits replace the defaults."""
    s = Screening.model_validate({"window": "2d", "shared_customer_ip": {"threshold": 3}})
    assert s.window_hours == 48
    assert s.limits("shared_customer_ip") == (3, 3)
    assert since_hours("6h", s) == 6 and since_hours(None, s) == 48
    with pytest.raises(ValueError):
        since_hours("90m", s)


async def test_a_report_refuses_an_unknown_reseller_and_a_bad_since() -> None:
    """build_report refuses what its caller asked wrongly as the admin API answers it: an
    OperationError 404 for a reseller the policy lacks, 400 for a `since` it cannot read."""
    policy = compile_policy(validate_policy(DEFAULT_POLICY, "policy.yaml"), 1)
    store = MemoryStore()
    with pytest.raises(OperationError) as err:
        await build_report(store, policy, None, "nobody")
    assert err.value.status == 404 and "no reseller 'nobody'" in str(err.value)
    with pytest.raises(OperationError) as err:
        await build_report(store, policy, "90m")
    assert err.value.status == 400 and "since '90m'" in str(err.value)


@pytest.mark.parametrize(("section", "field"), [
    ({"window": "90m"}, "screening.window"),
    ({"restricted_customer_share": {"threshold": 1.5}}, "screening.restricted_customer_share"
                                                        ".threshold"),
    ({"egress_spread": {"threshold": 4, "watch": 6}}, "screening.egress_spread.watch"),
    ({"shared_customer_ip": {"threshold": 2.5}}, "screening.shared_customer_ip.threshold"),
    ({"actions": {"flag": "ban"}}, "screening.actions.flag"),
    ({"denial_spike": {"treshold": 3}}, "screening.denial_spike.treshold"),
])
def test_bad_screening_sections_name_the_field(section: dict[str, Any], field: str) -> None:
    """A bad screening section is a ConfigError naming the field path."""
    doc = {**DEFAULT_POLICY, "screening": section}
    with pytest.raises(ConfigError) as exc:
        validate_policy(doc, "policy.yaml")
    assert any(p.field == field for p in exc.value.problems), str(exc.value)


# --- end to end ------------------------------------------------------------------------------

def _mix_policy(actions: dict[str, str] | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(DEFAULT_POLICY)
    doc["resellers"] = {
        "relay": {"status": "active", "require_customer": True},
        "honest": {"status": "active", "require_customer": True},
    }
    if actions is not None:
        doc["screening"] = {"actions": actions}
    return doc


RELAY_EGRESS = "192.0.2.1"  # US, AS64500 Demo Cloud US: an allowed datacenter
HONEST_EGRESS = "192.0.2.17"  # GB


def relay_mix() -> list[tuple[str, str]]:
    """(customer id, customer ip) of the relaying reseller's traffic."""
    mix = [(f"cn-{i}", "198.51.100.1") for i in range(3)]  # CN: restricted
    mix += [("kp-1", "198.51.100.49")]  # KP: restricted
    mix += [("vpn-1", "203.0.113.1"), ("tor-1", "203.0.113.17")]  # anonymizers
    mix += [(f"shared-{i}", "192.0.2.33") for i in range(12)]  # 12 ids on one address
    mix += [("priv-1", "10.0.0.5"), ("self-1", RELAY_EGRESS)]  # invalid customer ips
    mix += [("hopper", ip) for ip in ("192.0.2.1", "192.0.2.17", "192.0.2.33", "192.0.2.49",
                                      "192.0.2.65")]  # one customer, five countries
    return mix


HONEST_MIX = [(f"h-{i}", ip) for i, ip in enumerate(
    ("192.0.2.1", "192.0.2.33", "192.0.2.49", "192.0.2.65"))] * 3


async def send_mix(url: str, key: str, egress: str, mix: list[tuple[str, str]]) -> list[int]:
    """Send one request per (customer id, customer ip) as the reseller's egress; statuses."""
    out = []
    async with aiohttp.ClientSession() as s:
        for cid, cip in mix:
            async with s.post(url + "/v1/messages", headers={
                    "x-api-key": key, "X-Forwarded-For": egress, "X-Customer-Id": cid,
                    "X-Customer-IP": cip}, json={"model": "claude-3", "max_tokens": 8,
                                                 "messages": [{"role": "user",
                                                               "content": "hi"}]}) as r:
                await r.read()
                out.append(r.status)
    return out


def _flags(report: dict[str, Any], reseller: str) -> set[str]:
    entry = next(r for r in report["resellers"] if r["reseller"] == reseller)
    return {s["name"] for s in entry["signals"] if s["state"] == "flag"}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_report_flags_the_relay_and_not_the_honest_reseller(
        request: pytest.FixtureRequest, kind: str, tmp_path: Path,
        upstream: FakeUpstream) -> None:
    """After the traffic mix GET /admin/report flags the relaying reseller with its reasons,
    not the honest one; the alert line is printed once per signal (shadow: no suspension);
    the CLI prints the same report; the gauge shows the flags."""
    async with running_gateway(tmp_path, upstream.url, _mix_policy(),
                               admin_listen=f"127.0.0.1:{free_port()}",
                               store=store_config(request, kind)) as gw:
        _, relay_key = await gw.issue_key("relay")
        _, honest_key = await gw.issue_key("honest")
        statuses = await send_mix(gw.url, relay_key, RELAY_EGRESS, relay_mix())
        assert statuses.count(403) == 6  # 4 restricted + 2 anonymizers
        assert set(await send_mix(gw.url, honest_key, HONEST_EGRESS, HONEST_MIX)) == {200}

        async def flagged() -> dict[str, Any] | None:
            status, body = await gw.admin("GET", "/admin/report")
            assert status == 200, body
            return body if _flags(body, "relay") >= {
                "restricted_customer_share", "invalid_customer_ip_share",
                "customer_country_hopping", "shared_customer_ip"} else None

        report = await poll(flagged)
        assert _flags(report, "honest") == set()
        relay = next(r for r in report["resellers"] if r["reseller"] == "relay")
        assert relay["requests"] == len(relay_mix()) and relay["denied"] == 6
        assert {"country": "CN", "requests": 3} in relay["top_customer_countries"]
        assert relay["top_client_asns"][0] == {"asn": 64500, "name": "Demo Cloud US",
                                               "requests": len(relay_mix())}
        cfg = tmp_path / "gateway.yaml"
        listed = await asyncio.to_thread(run_cli, "report", "resellers", "--json", config=cfg)
        assert listed.returncode == 0, listed.stderr
        assert _flags(json.loads(listed.stdout), "relay") >= _flags(report, "relay")
        table = await asyncio.to_thread(run_cli, "report", "reseller", "relay", config=cfg)
        assert table.returncode == 0, table.stderr
        assert "FLAG  restricted_customer_share" in table.stdout
        assert "customer countries:" in table.stdout and "CN 3" in table.stdout
        missing = await asyncio.to_thread(run_cli, "report", "reseller", "nobody", config=cfg)
        assert missing.returncode == 1 and "nobody" in missing.stderr
        status, one = await gw.admin("GET", "/admin/report/honest?since=1h")
        assert status == 200 and [r["reseller"] for r in one["resellers"]] == ["honest"]
        assert one["since"] == "1h"
        status, _ = await gw.admin("GET", "/admin/report/nobody")
        assert status == 404
        status, _ = await gw.admin("GET", "/admin/report?since=forever")
        assert status == 400

        # More traffic and flushes: still one alert line per flagged signal.
        await send_mix(gw.url, relay_key, RELAY_EGRESS, relay_mix()[:5])
        await poll(lambda: len(gw.logs.events("screening_alert")) >= 4)
        await gw.admin("GET", "/admin/report")
        alerts = gw.logs.events("screening_alert")
        per_signal = [(a["reseller"], a["signal"]) for a in alerts]
        assert len(per_signal) == len(set(per_signal))
        assert {a["reseller"] for a in alerts} == {"relay"}
        assert all(a["value"] >= a["threshold"] for a in alerts)
        status, live = await gw.admin("GET", "/admin/policy")
        assert live["policy"]["resellers"]["relay"]["status"] == "active"
        async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
        assert ('gateway_screening_flagged{reseller="relay",signal="shared_customer_ip"} 1.0'
                in text)
        assert ('gateway_screening_flagged{reseller="honest",signal="shared_customer_ip"} 0.0'
                in text)


async def test_suspend_in_enforce_mode_refuses_the_relay_keys(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """With actions {flag: suspend, mode: enforce} the relaying reseller is suspended in the
    store (audited) and its keys are refused; the honest reseller keeps being served."""
    policy = _mix_policy({"flag": "suspend", "mode": "enforce"})
    async with running_gateway(tmp_path, upstream.url, policy) as gw:
        _, relay_key = await gw.issue_key("relay")
        _, honest_key = await gw.issue_key("honest")
        await send_mix(gw.url, relay_key, RELAY_EGRESS, relay_mix())

        async def refused() -> bool:
            statuses = await send_mix(gw.url, relay_key, RELAY_EGRESS, [("ok-1", "192.0.2.49")])
            return statuses == [403] and any(
                x.get("reason") == "reseller_suspended" for x in gw.logs.requests())

        await poll(refused)
        assert await send_mix(gw.url, honest_key, HONEST_EGRESS, HONEST_MIX[:2]) == [200, 200]
        _, audit = await gw.admin("GET", "/admin/audit")
        changed = [e for e in audit["events"] if e["action"] == "reseller_status_changed"]
        assert [(e["target"], e["status"], e["actor"]) for e in changed] == [
            ("relay", "suspended", "screening")]


def test_policy_file_documents_the_screening_defaults() -> None:
    """The commented `screening:` block of config/policy.yaml validates and holds exactly the
    defaults."""
    import yaml

    from gateway.policy import SCREENING_DEFAULTS
    from tests.support.gateway import REPO

    text = (REPO / "config" / "policy.yaml").read_text()
    block = text[text.index("# screening:"):]
    doc = yaml.safe_load("\n".join(line[2:] if line.startswith("# ") else line[1:]
                                   for line in block.splitlines()))
    s = Screening.model_validate(doc["screening"])
    assert {n: s.limits(n) for n in SIGNALS} == SCREENING_DEFAULTS
    assert (s.window, s.actions.flag, s.actions.mode) == ("24h", "alert", "shadow")
