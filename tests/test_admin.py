"""Unit tests for gateway.admin: the admin listener's token check, probes and error bodies, on
a gateway running in-process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import aiohttp

from gateway.admin import SERVER_HEADER
from gateway.store.base import Tally, UsageKey
from gateway.usage_report import FIELDS, utc_day
from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream


async def test_admin_paths_need_the_bearer_token(tmp_path: Path,
                                                 upstream: FakeUpstream) -> None:
    """No token, a wrong token or another scheme is 401 authentication_error in the one error
    body; probes need no token; every answer says only `Server: gateway`."""
    async with running_gateway(tmp_path, upstream.url) as gw, aiohttp.ClientSession() as s:
        token = gw.admin_headers["Authorization"].split(" ", 1)[1]
        for headers in ({}, {"Authorization": "Bearer wrong"},
                        {"Authorization": f"Basic {token}"}):
            async with s.get(gw.admin_url + "/admin/keys", headers=headers) as r:
                body = await r.json()
                assert r.status == 401, headers
                assert (body["error"]["type"], body["error"]["code"]) == (
                    "authentication_error", "invalid_admin_token")
                assert body["request_id"] == r.headers["x-request-id"]
                assert token not in await r.text()
                assert r.headers["Server"] == SERVER_HEADER
        for probe in ("/healthz", "/readyz"):
            async with s.get(gw.admin_url + probe) as r:
                assert r.status == 200, probe
        async with s.get(gw.admin_url + "/metrics") as r:
            assert "gateway_requests_total" in await r.text()


async def test_key_operations_answer_with_their_status(tmp_path: Path,
                                                       upstream: FakeUpstream) -> None:
    """Issue is 201 with the key once, show never has it, a bad field is 400, an unknown key
    404."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        key_id, key = await gw.issue_key(models=["claude-*"])
        status, shown = await gw.admin("GET", f"/admin/keys/{key_id}")
        assert status == 200 and shown["key_id"] == key_id
        assert key not in str(shown) and "secret_hash" not in shown
        status, body = await gw.admin("POST", "/admin/keys", json={"reseller": "direct",
                                                                   "rpm": -1})
        assert status == 400 and "rpm" in body["error"]["message"]
        status, _ = await gw.admin("POST", "/admin/keys/0000000000000000/revoke")
        assert status == 404


async def test_every_admin_error_has_the_one_body_and_a_request_id(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Unknown paths, wrong methods, bad queries, missing records and version conflicts all
    answer the documented error body with its type, code and request id; successes carry a
    request id too."""
    async with running_gateway(tmp_path, upstream.url) as gw, aiohttp.ClientSession(
            headers=gw.admin_headers) as s:
        cases = [("GET", "/admin/nothing-here", 404, "not_found_error", "not_found"),
                 ("DELETE", "/admin/keys", 405, "invalid_request_error", "method_not_allowed"),
                 ("GET", "/admin/explain", 400, "invalid_request_error", "invalid_request"),
                 ("GET", "/admin/keys/0000000000000000", 404, "not_found_error", "not_found"),
                 ("PUT", "/admin/policy?expected_version=99", 409, "invalid_request_error",
                  "version_conflict"),
                 ("PUT", "/admin/policy?expected_version=x", 400, "invalid_request_error",
                  "invalid_request"),
                 ("GET", "/admin/usage?since=soon", 400, "invalid_request_error",
                  "invalid_request"),
                 ("GET", "/admin/usage?by=week", 400, "invalid_request_error",
                  "invalid_request"),
                 ("GET", "/admin/usage?key_id=k", 400, "invalid_request_error",
                  "invalid_request")]
        for method, path, status, type_, code in cases:
            async with s.request(method, gw.admin_url + path, data="{}"
                                 if method == "PUT" else None) as r:
                body = await r.json()
                assert r.status == status, (path, body)
                assert set(body) == {"type", "error", "request_id"}, body
                assert (body["type"], body["error"]["type"], body["error"]["code"]) == (
                    "error", type_, code), path
                assert body["error"]["message"] and body["request_id"] == r.headers[
                    "x-request-id"]
        async with s.get(gw.admin_url + "/admin/keys") as r:
            assert r.status == 200 and r.headers["x-request-id"].startswith("req_")


async def test_an_invalid_policy_lists_every_problem_in_the_one_body(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A policy with several faults is 400 invalid_policy: the message has one line per
    problem and `error.errors` lists each field and reason; the live policy stays."""
    open_policy = {"version": 1, "default_action": "allow", "rules": []}
    async with running_gateway(tmp_path, upstream.url, open_policy,
                               geo={"asn_db": None, "anonymous_ip_db": None}) as gw:
        # Two rules on databases this gateway lacks: two problems found in one pass.
        bad = {**open_policy, "rules": [
            {"id": "a", "action": "deny", "reason": "x", "match": {"anonymizer": ["vpn"]}},
            {"id": "b", "action": "deny", "reason": "y", "match": {"asn": [64496]}}]}
        status, body = await gw.admin("PUT", "/admin/policy", data=json.dumps(bad))
        assert status == 400, body
        assert (body["error"]["type"], body["error"]["code"]) == ("invalid_request_error",
                                                                  "invalid_policy")
        assert [p["field"] for p in body["error"]["errors"]] == [
            "rules[a].match.anonymizer", "rules[b].match.asn"]
        assert all(p["reason"].startswith("needs geo.") for p in body["error"]["errors"])
        assert body["error"]["message"].count("\n") == 1
        assert gw.service.policy_version == 1


async def test_usage_answers_the_ledger_with_its_filters(tmp_path: Path,
                                                         upstream: FakeUpstream) -> None:
    """GET /admin/usage reports the ledger: rows with all eight fields, totals, the query
    parameters as filters and grouping, and `since` as a day range; a bad parameter is a 400
    naming it."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        today, old = utc_day(time.time()), utc_day(time.time() - 30 * 86400)
        await gw.service.store.add_usage({
            UsageKey(today, "acme", "ka", "c1", "claude-x"): Tally(2, 20, 200),
            UsageKey(today, "direct", "kd", None, "gpt-4"): Tally(1, 10, 100),
            UsageKey(old, "acme", "ka", "c1", "claude-x"): Tally(5, 5, 5)}, 400)
        status, body = await gw.admin("GET", "/admin/usage")
        assert status == 200, body
        assert body["totals"] == {"requests": 3, "input_tokens": 30, "output_tokens": 300}
        assert [list(r) for r in body["rows"]] == [list(FIELDS)] * 2
        status, body = await gw.admin("GET", f"/admin/usage?since={old}&key=ka&by=day")
        assert status == 200, body
        assert [(r["day"], r["reseller"], r["key_id"], r["model"], r["requests"])
                for r in body["rows"]] == [(old, "acme", "ka", None, 5),
                                           (today, "acme", "ka", None, 2)]
        status, body = await gw.admin("GET", "/admin/usage?by=weekly")
        assert status == 400 and "by 'weekly'" in body["error"]["message"]
