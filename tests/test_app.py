"""Unit tests for gateway.app: the GatewayService of an in-process gateway reports readiness
and the live policy version, and follows a policy applied through its store."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.gateway import DEFAULT_POLICY, poll, running_gateway
from tests.support.upstream import FakeUpstream


async def test_a_started_service_is_ready_with_every_check(tmp_path: Path,
                                                           upstream: FakeUpstream) -> None:
    """After start: ready, the policy file loaded as version 1, the store and geo checks ok."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        ready, body = gw.service.readiness()
        assert ready is True
        assert body["status"] == "ready" and body["degraded"] == []
        assert body["checks"]["store"] == "ok"
        assert body["checks"]["policy"] == {"version": 1}
        assert set(body["checks"]["geo"]) == {"country", "asn", "anonymous_ip"}
        assert gw.service.policy_version == 1
        assert gw.service.proxy_port and gw.service.admin_port != gw.service.proxy_port


async def test_a_policy_stored_by_another_instance_becomes_live(tmp_path: Path,
                                                                upstream: FakeUpstream) -> None:
    """A policy version written to the store is picked up as the live version."""
    async with running_gateway(tmp_path, upstream.url) as gw:
        version = await gw.service.store.put_policy(
            json.dumps(DEFAULT_POLICY), "other-instance")
        assert version == 2
        await poll(lambda: gw.service.policy_version == 2)
        assert gw.service.readiness()[1]["checks"]["policy"] == {"version": 2}
