"""Unit tests for gateway.explain: the decision trace of a hypothetical request, computed on the
pipeline and key snapshot of a gateway running in-process."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import OperationError
from gateway.explain import explain
from tests.support.gateway import DEFAULT_POLICY, running_gateway
from tests.support.upstream import FakeUpstream


async def test_explain_traces_allow_scope_denial_unknown_key_and_bad_path(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """A key in scope is allowed; a model out of scope, an unknown key id and a path that
    climbs above the root are denied at their own stage with their own code."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        key_id, key = await gw.issue_key(models=["claude-*"])
        pipe, reg = gw.service.pipeline.snapshot, gw.service.pipeline.scopes
        ok = explain(pipe, reg, "192.0.2.1", key=key, model="claude-3")
        assert ok["request"]["key_id"] == key_id
        assert ok["identity"]["scopes"]["models"] == ["claude-*"]
        assert ok["client"]["country"] == "US"
        assert ok["decision"]["decision"] == "allow"
        scope = explain(pipe, reg, "192.0.2.1", key=key, model="gpt-4o")["decision"]
        assert (scope["status"], scope["code"], scope["stage"]) == (
            403, "model_not_allowed", "scopes")
        unknown = explain(pipe, reg, "192.0.2.1", key_id="0000000000000000")["decision"]
        assert (unknown["status"], unknown["code"]) == (401, "invalid_api_key")
        by_id = explain(pipe, reg, "192.0.2.1", key_id=key_id, model="claude-3")
        assert by_id["decision"]["decision"] == "allow"
        bad = explain(pipe, reg, "192.0.2.1", key=key, path="/v1/../../x")["decision"]
        assert (bad["status"], bad["code"], bad["stage"]) == (400, "invalid_path", "path")


async def test_explain_judges_the_client_certificate_given(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """For a reseller bound to client certificates, explain without a fingerprint says 403
    client_certificate_required, with another one client_certificate_mismatch, with its own
    (in openssl's colon form too) allow; a malformed fingerprint is an OperationError 400."""
    bound = "ab" * 32
    policy = {**DEFAULT_POLICY, "resellers": {
        **DEFAULT_POLICY["resellers"], "direct": {
            **DEFAULT_POLICY["resellers"]["direct"], "client_cert_sha256": [bound]}}}
    async with running_gateway(tmp_path, upstream.url, policy) as gw:
        key_id, _ = await gw.issue_key()
        pipe, reg = gw.service.pipeline.snapshot, gw.service.pipeline.scopes
        for cert, code in ((None, "client_certificate_required"),
                           ("cd" * 32, "client_certificate_mismatch")):
            out = explain(pipe, reg, "192.0.2.1", key_id=key_id, client_cert_sha256=cert)
            assert (out["decision"]["status"], out["decision"]["code"],
                    out["decision"]["stage"]) == (403, code, "identity")
        colons = ":".join(["AB"] * 32)
        ok = explain(pipe, reg, "192.0.2.1", key_id=key_id, client_cert_sha256=colons)
        assert ok["decision"]["decision"] == "allow"
        assert ok["request"]["client_cert_sha256"] == bound
        assert ok["identity"]["reseller_config"]["client_cert_sha256"] == [bound]
        with pytest.raises(OperationError, match="not a SHA-256 certificate fingerprint"
                           ) as err:
            explain(pipe, reg, "192.0.2.1", key_id=key_id, client_cert_sha256="xyz")
        assert err.value.status == 400 and str(err.value).startswith("client_cert_sha256: ")
