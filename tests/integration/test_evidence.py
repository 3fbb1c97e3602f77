"""Evidence end to end: signed customer attestations through a real gateway with the official
SDKs (forged, stale, replayed and unsigned claims refused, the signature logged), explain
judging the same header, and a real `gateway run` writing a hash-chained log that `gateway
audit verify` passes whole and fails, naming the line, once a line is removed or altered."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anthropic
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.attestation import parse_header, sign
from tests.support.cli import US, cli, gateway_process, send
from tests.support.gateway import DEFAULT_POLICY, poll, running_gateway
from tests.support.upstream import FakeUpstream

MESSAGE: dict[str, Any] = {"model": "claude-test-1", "max_tokens": 64,
                           "messages": [{"role": "user", "content": "hi"}]}
CID, CIP = "cust-7", "192.0.2.20"  # GB in the demo databases
PRIVATE = Ed25519PrivateKey.generate()
FORGER = Ed25519PrivateKey.generate()


def _policy(required: bool = True) -> dict[str, Any]:
    doc = copy.deepcopy(DEFAULT_POLICY)
    doc["resellers"]["acme"]["attestation_key"] = PRIVATE.public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
    doc["resellers"]["acme"]["require_signed_attestation"] = required
    return doc


def _headers(attestation: str | None, cid: str = CID) -> dict[str, str]:
    out = {**US, "X-Customer-Id": cid, "X-Customer-IP": CIP}
    if attestation is not None:
        out["X-Customer-Attestation"] = attestation
    return out


async def test_signed_attestations_through_the_official_sdks(tmp_path: Path,
                                                             upstream: FakeUpstream) -> None:
    """Where acme requires signing, the Anthropic and OpenAI SDKs get 200 with a valid
    signature (logged as attestation_sig) and 403 with the typed code for a forged, stale,
    replayed-for-another-customer, replayed-for-another-path, malformed or missing one."""
    async with running_gateway(tmp_path, upstream.url, _policy()) as gw:
        _, key = await gw.issue_key("acme")
        now = int(time.time())
        good = sign(PRIVATE, CID, CIP, "POST", "/v1/messages", now)
        async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                            default_headers=_headers(good)) as client:
            reply = await client.messages.create(**MESSAGE)
        assert reply.content
        line = (await poll(gw.logs.requests))[-1]
        assert (line["status"], line["attestation_sig"]) == (200, parse_header(good).sig)
        assert "X-Customer-Attestation" not in upstream.last_request.headers

        chat = sign(PRIVATE, CID, CIP, "POST", "/v1/chat/completions", now)
        async with openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0,
                                      default_headers=_headers(chat)) as oai:
            done = await oai.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}])
        assert done.choices

        refused = [
            (_headers(sign(FORGER, CID, CIP, "POST", "/v1/messages", now)),
             "attestation_signature_invalid"),
            (_headers(sign(PRIVATE, CID, CIP, "POST", "/v1/messages", now - 301)),
             "attestation_signature_stale"),
            (_headers(good, cid="cust-8"), "attestation_signature_invalid"),
            (_headers(chat), "attestation_signature_invalid"),  # signed for another path
            (_headers("v1;ts=1;sig=short"), "attestation_signature_malformed"),
            (_headers(None), "attestation_signature_required"),
        ]
        forwarded = len(upstream.requests)
        for headers, code in refused:
            async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0,
                                                default_headers=headers) as client:
                with pytest.raises(anthropic.PermissionDeniedError) as err:
                    await client.messages.create(**MESSAGE)
            body: Any = err.value.body
            assert body["error"]["code"] == code, (headers, body)
        assert len(upstream.requests) == forwarded


async def test_a_rotated_attestation_key_refuses_what_the_old_one_signed(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A header accepted (and so remembered) under acme's key is refused once a new policy
    rotates the key, and one the new key signed for the same claim and time is accepted."""
    async with running_gateway(tmp_path, upstream.url, _policy()) as gw:
        _, key = await gw.issue_key("acme")
        now = int(time.time())
        old = sign(PRIVATE, CID, CIP, "POST", "/v1/messages", now)
        new = sign(FORGER, CID, CIP, "POST", "/v1/messages", now)
        for _ in range(2):
            assert (await send(gw.url, key, headers=_headers(old)))[0] == 200
        rotated = _policy()
        rotated["resellers"]["acme"]["attestation_key"] = FORGER.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()
        await gw.apply_policy(rotated)
        status, body, _ = await send(gw.url, key, headers=_headers(old))
        assert (status, body["error"]["code"]) == (403, "attestation_signature_invalid")
        assert (await send(gw.url, key, headers=_headers(new)))[0] == 200


async def test_optional_signing_and_explain_judge_the_same_header(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """Without the requirement an unsigned claim passes but a forged one is still refused, and
    explain (given the header value) reaches the live path's verdict."""
    async with running_gateway(tmp_path, upstream.url, _policy(required=False)) as gw:
        key_id, key = await gw.issue_key("acme")
        now = int(time.time())
        forged = sign(FORGER, CID, CIP, "POST", "/v1/messages", now)
        good = sign(PRIVATE, CID, CIP, "POST", "/v1/messages", now)
        for attestation, status, code in ((None, 200, None), (good, 200, None),
                                          (forged, 403, "attestation_signature_invalid")):
            got, body, _ = await send(gw.url, key, headers=_headers(attestation))
            assert got == status and (body.get("error") or {}).get("code") == code
            query = {"ip": US["X-Forwarded-For"], "key_id": key_id, "customer_id": CID,
                     "customer_ip": CIP, "path": "/v1/messages", "method": "POST"}
            if attestation:
                query["attestation"] = attestation
            ok, out = await gw.admin("GET", "/admin/explain?" + urlencode(query))
            assert ok == 200
            assert (out["decision"]["status"], out["decision"]["code"]) == (status, code)


async def test_a_real_gateway_writes_a_chain_that_audit_verify_checks(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """`gateway run` with log.hash_chain writes request, audit and other lines in one chain;
    `gateway audit verify` exits 0 on the file, 1 naming the line once a line is deleted or
    altered, and 2 for a file it cannot read."""
    async with gateway_process(tmp_path, upstream.url, log={"hash_chain": True}) as gw:
        code, out, err = await cli("keys", "issue", "--reseller", "direct", "--json",
                                   "--config", str(gw.config), cwd=tmp_path)
        assert code == 0, err
        key = json.loads(out)["key"]
        for _ in range(3):
            status, _, _ = await send(gw.url, key)
            assert status == 200
        await poll(lambda: len(gw.events("request")) == 3)
        gw.stop()
    lines = [raw for raw in gw.raw if raw.startswith("{")]
    events = [json.loads(x)["event"] for x in lines]
    assert {"gateway_started", "request"} <= set(events)
    assert all({"chain_id", "prev_hash", "hash"} <= set(json.loads(x)) for x in lines)
    log = tmp_path / "gateway.log"
    log.write_text("\n".join(lines) + "\n")
    code, out, _ = await cli("audit", "verify", str(log), cwd=tmp_path)
    assert code == 0 and out.startswith("ok:"), out

    n = events.index("request") + 1  # the first request line (1-based)
    log.write_text("\n".join(lines[:n - 1] + lines[n:]) + "\n")
    code, out, _ = await cli("audit", "verify", str(log), cwd=tmp_path)
    assert code == 1 and f"line {n}:" in out and "removed" in out, out

    altered = lines[:]
    altered[n - 1] = altered[n - 1].replace('"status":200', '"status":403')
    assert altered != lines
    log.write_text("\n".join(altered) + "\n")
    code, out, _ = await cli("audit", "verify", str(log), cwd=tmp_path)
    assert code == 1 and f"line {n}:" in out and "altered" in out, out

    code, _, err = await cli("audit", "verify", str(tmp_path / "missing.log"), cwd=tmp_path)
    assert code == 2 and "cannot read" in err
