"""The live gateway and /admin/explain give the same verdict: one decision (gateway/decision.py)
judged on a matrix of keys, resellers, addresses, attestation forms, models and paths, and over
TLS on the client certificate presented."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.certs import Issued, TestCA
from tests.support.gateway import DEFAULT_POLICY, running_gateway
from tests.support.upstream import FakeUpstream

KEY_SCOPES: dict[str, dict[str, Any]] = {
    "unscoped": {}, "claude-only": {"models": ["claude-*"]},
    "messages-only": {"paths": ["/v1/messages"]}}
RESELLERS = ("direct", "acme")  # acme: require_customer and a country list
ADDRESSES = {"US": "192.0.2.1", "CN": "198.51.100.5", "VPN": "203.0.113.5"}
ATTESTATIONS: dict[str, dict[str, str]] = {
    "none": {}, "id+ip": {"customer_id": "c1", "customer_ip": "192.0.2.50"},
    "ip only": {"customer_ip": "192.0.2.50"}}
MODELS = ("claude-test-1", "gpt-4o")
PATHS = ("/v1/messages", "/v1/chat/completions")

_HEADER = {"customer_id": "X-Customer-Id", "customer_ip": "X-Customer-IP"}
_GENEROUS = {"rpm": 1_000_000, "itpm": 1_000_000_000, "otpm": 1_000_000_000,
             "concurrency": 10_000}


def _generous_policy() -> dict[str, Any]:
    """The shipped policy with every limit far above what the matrix sends."""
    policy = copy.deepcopy(DEFAULT_POLICY)
    policy["limits"] = {**policy.get("limits", {}), "key": _GENEROUS, "reseller": _GENEROUS,
                        "customer": {k: v for k, v in _GENEROUS.items() if k != "concurrency"}}
    for reseller in policy["resellers"].values():
        reseller["limits"] = _GENEROUS
        reseller.pop("customer_limits", None)
    return policy


async def test_live_requests_and_explain_agree_on_every_case(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Every case of the matrix gets the same (status, code) live as from /admin/explain."""
    async with running_gateway(tmp_path, upstream.url, _generous_policy()) as gw, \
            aiohttp.ClientSession() as http:
        keys = {(scope, r): (await gw.issue_key(r, **spec))[1]
                for scope, spec in KEY_SCOPES.items() for r in RESELLERS}
        disagreements = []
        verdicts = set()
        for (scope, r), addr, att, model, path in itertools.product(
                keys, ADDRESSES, ATTESTATIONS, MODELS, PATHS):
            key, ip, fields = keys[scope, r], ADDRESSES[addr], ATTESTATIONS[att]
            headers = {"x-api-key": key, "X-Forwarded-For": ip, "content-type": "application/json",
                       **{_HEADER[f]: v for f, v in fields.items()}}
            body = json.dumps({"model": model, "max_tokens": 16,
                               "messages": [{"role": "user", "content": "hi"}]})
            async with http.post(gw.url + path, data=body, headers=headers) as resp:
                doc = await resp.json(content_type=None)
                live = (resp.status, None if resp.status == 200 else doc["error"]["code"])
            async with http.get(gw.admin_url + "/admin/explain", headers={
                    **gw.admin_headers, "x-explain-key": key},
                    params={"ip": ip, "model": model, "path": path, **fields}) as resp:
                assert resp.status == 200
                decision = (await resp.json())["decision"]
            explained = (decision["status"], decision["code"])
            assert (decision["decision"] == "allow") == (explained[0] == 200)
            verdicts.add(live)
            if live != explained:
                disagreements.append((scope, r, addr, att, model, path, live, explained))
        assert disagreements == []
        # The matrix reaches every stage: allowed, rules, attestation and both scopes.
        assert {(200, None), (403, "unsupported_country_region_territory"),
                (403, "anonymizer_not_allowed"), (403, "customer_attestation_required"),
                (403, "model_not_allowed"), (403, "path_not_allowed")} <= verdicts


async def test_live_tls_requests_and_explain_agree_on_client_certificates(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Over TLS with a reseller bound to one client certificate, every case of presented
    certificate (none, the bound one, another), reseller, address and attestation gets the
    same (status, code) live as from /admin/explain given that certificate's fingerprint."""
    ca = TestCA(tmp_path / "ca")
    server = ca.issue("server")
    certs: dict[str, Issued | None] = {"none": None, "bound": ca.issue("bound", server=False),
                                       "other": ca.issue("other", server=False)}
    policy = _generous_policy()
    bound = certs["bound"]
    assert bound is not None
    policy["resellers"]["direct"]["client_cert_sha256"] = [bound.sha256]
    tls = {"cert_file": str(server.cert_file), "key_file": str(server.key_file),
           "client_ca_file": str(ca.cert_file)}
    async with running_gateway(tmp_path, upstream.url, policy, tls=tls) as gw, \
            aiohttp.ClientSession() as http:
        base = f"https://127.0.0.1:{gw.service.proxy_port}"
        keys = {r: (await gw.issue_key(r))[1] for r in RESELLERS}
        disagreements, verdicts = [], set()
        for cert, r, addr, att in itertools.product(certs, RESELLERS, ("US", "CN"),
                                                    ("none", "id+ip")):
            issued, ip, fields = certs[cert], ADDRESSES[addr], ATTESTATIONS[att]
            headers = {"x-api-key": keys[r], "X-Forwarded-For": ip,
                       **{_HEADER[f]: v for f, v in fields.items()}}
            body = {"model": "claude-test-1", "max_tokens": 16,
                    "messages": [{"role": "user", "content": "hi"}]}
            async with http.post(base + "/v1/messages", json=body, headers=headers,
                                 ssl=ca.client_context(issued)) as resp:
                doc = await resp.json(content_type=None)
                live = (resp.status, None if resp.status == 200 else doc["error"]["code"])
            params = {"ip": ip, "model": "claude-test-1", **fields,
                      **({"client_cert_sha256": issued.sha256} if issued else {})}
            async with http.get(gw.admin_url + "/admin/explain", params=params, headers={
                    **gw.admin_headers, "x-explain-key": keys[r]}) as resp:
                assert resp.status == 200
                decision = (await resp.json())["decision"]
            verdicts.add(live)
            if live != (decision["status"], decision["code"]):
                disagreements.append((cert, r, addr, att, live, decision))
        assert disagreements == []
        assert {(200, None), (403, "client_certificate_required"),
                (403, "client_certificate_mismatch"),
                (403, "unsupported_country_region_territory"),
                (403, "customer_attestation_required")} <= verdicts
