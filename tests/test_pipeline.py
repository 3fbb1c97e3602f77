"""Unit tests for gateway.pipeline: request ids, compiled key scopes, and the stages run by a
gateway in-process (a refusal before the body, the reserved paths)."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp

from gateway.pipeline import _NO_PATH, _json_object, _new_request_id, _ScopeCache
from gateway.store.base import KeyRecord
from tests.support.gateway import running_gateway
from tests.support.upstream import FakeUpstream


def test_request_ids_are_unique_and_well_formed() -> None:
    """Generated ids share this process's random prefix and never repeat."""
    ids = [_new_request_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(re.fullmatch(r"req_[0-9a-f]{12}[0-9a-f]{12}", i) for i in ids)
    assert len({i[:16] for i in ids}) == 1


def test_json_object_decodes_a_judged_body() -> None:
    """A body already judged to be a JSON object decodes to that object."""
    assert _json_object(b'{"model": "m", "n": [1]}') == {"model": "m", "n": [1]}


def _rec(**kw: object) -> KeyRecord:
    return KeyRecord(key_id="k1", reseller="r", secret_hash="h", **kw)  # type: ignore[arg-type]


def test_scope_cache_compiles_countries_and_reuses_an_unchanged_record() -> None:
    """`unknown` becomes None in the country set, no countries means no restriction, and the
    same record object is served from the cache while a changed one is recompiled."""
    cache = _ScopeCache()
    rec = _rec(countries=["DE", "unknown"], paths=["/v1/*"])
    models, paths, countries = cache.get(rec)
    assert countries == frozenset({"DE", None})
    assert paths.match("/v1/messages") and not paths.match("/v2/messages")
    again = cache.get(rec)
    assert again[0] is models and again[1] is paths
    changed = _rec(countries=[])
    assert cache.get(changed)[2] is None
    assert cache.get(changed)[1] is not paths


def test_a_stored_path_glob_that_no_longer_compiles_reaches_no_path() -> None:
    """A key whose stored path glob is invalid fails closed: its path scope matches nothing."""
    _, paths, _ = _ScopeCache().get(_rec(paths=["/v1/**x"]))
    assert paths is _NO_PATH
    assert not paths.match("/v1/messages")


async def test_reserved_paths_and_missing_keys_are_refused_on_the_proxy_listener(
        tmp_path: Path, upstream: FakeUpstream) -> None:
    """/healthz and /admin/* are 404 on the proxy listener; a request without a key is 401
    with a request id; neither reaches the upstream."""
    async with running_gateway(tmp_path, upstream.url) as gw, aiohttp.ClientSession() as s:
        for path in ("/healthz", "/admin/keys"):
            async with s.get(gw.url + path) as r:
                assert r.status == 404, path
        async with s.post(gw.url + "/v1/messages", json={"model": "claude-3"}) as r:
            body = await r.json()
            assert r.status == 401
            assert body["error"]["type"] == "authentication_error"
            assert body["request_id"] == r.headers["x-request-id"]
    assert upstream.requests == []
