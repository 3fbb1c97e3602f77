"""The store operations of the `gateway` command (keys, policy, audit, explain, usage) behind
one interface, with two implementations: on the store directly, and through a running
gateway's admin API (the embedded store lives in that process). One error type for both."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import quote

import aiohttp

from gateway import key_admin
from gateway.audit import parse_limit, store_policy
from gateway.errors import OperationError, StoreError
from gateway.settings import ConfigError, load_yaml
from gateway.store.base import PolicyConflict, Store

if TYPE_CHECKING:
    from gateway.policy import CompiledPolicy, PolicyDoc
    from gateway.settings import LoadedConfig
    from gateway.usage_report import UsageQuery


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just issued or rotated: the full key is shown this once."""

    key_id: str
    key: str
    record: dict[str, Any]  # the key as shown (key_admin.show)


@dataclass(frozen=True, slots=True)
class LivePolicy:
    """The stored policy: its version, when and by whom it was applied, and the document."""

    version: int
    applied_at: float | None
    actor: str | None
    policy: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExplainQuery:
    """The request `explain` judges: a client address and a key (full, by id, or any key of
    a reseller), with the optional attestation, model and path."""

    ip: str
    key: str | None = None
    key_id: str | None = None
    reseller: str | None = None
    customer_ip: str | None = None
    customer_id: str | None = None
    model: str | None = None
    path: str = "/v1/messages"
    attestation: str | None = None  # an X-Customer-Attestation value
    method: str = "POST"
    #: the client certificate the connection presented (SHA-256 fingerprint), if any
    client_cert_sha256: str | None = None


class Operations(Protocol):
    """What the CLI does to the store. Both implementations return the same values for the
    same store contents and raise OperationError with the same status for the same refusal
    (tests/test_operations.py runs one suite over both)."""

    async def issue_key(self, spec: dict[str, Any]) -> IssuedKey:
        """A new key from `spec` (key_admin.issue_key's fields)."""

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """The key as shown after `changes` (null clears a field)."""

    async def list_keys(self, reseller: str | None = None) -> list[dict[str, Any]]:
        """Every key as shown (of `reseller` only, if given)."""

    async def show_key(self, key_id: str) -> dict[str, Any]:
        """One key as shown, with its last use."""

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        """The key as shown after its revocation."""

    async def rotate_key(self, key_id: str, overlap_s: float) -> IssuedKey:
        """A new secret for the key; the old one keeps working for `overlap_s` seconds."""

    async def get_policy(self) -> LivePolicy | None:
        """The live policy; None when none is stored."""

    async def put_policy(self, text: str, expected_version: int | None) -> int:
        """Validate and store the policy `text` (YAML or JSON) if the live version is still
        `expected_version` (409 otherwise); audited. The new version."""

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` audit events since `since`, oldest first, with `time_iso`."""

    async def explain(self, query: ExplainQuery) -> dict[str, Any]:
        """The decision trace for `query` (gateway.explain's document)."""

    async def report(self, since: str | None, reseller: str | None) -> dict[str, Any]:
        """The reseller screening report (docs/architecture.md §15), of every reseller or
        of `reseller` alone (404 when the live policy has none such; 400 for a bad since)."""

    async def usage(self, query: UsageQuery) -> dict[str, Any]:
        """The usage ledger's report for `query`: {"rows": [...], "totals": {...}}
        (gateway.usage_report)."""


class DirectOperations:
    """The operations on a started store, through gateway.key_admin (as the admin API does them).
    `config` gives the geo databases and settings `put_policy` and `explain` need; `actor`
    names the changes in the audit trail."""

    def __init__(self, store: Store, config: LoadedConfig, actor: str) -> None:
        self.store = store
        self.config = config
        self.actor = actor

    async def issue_key(self, spec: dict[str, Any]) -> IssuedKey:
        with _mapped():
            rec, full = await key_admin.issue_key(self.store, spec, self.actor)
        return IssuedKey(rec.key_id, full, key_admin.show(rec))

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        with _mapped():
            return await key_admin.update_key(self.store, key_id, changes, self.actor)

    async def list_keys(self, reseller: str | None = None) -> list[dict[str, Any]]:
        with _mapped():
            return await key_admin.list_keys(self.store, reseller)

    async def show_key(self, key_id: str) -> dict[str, Any]:
        with _mapped():
            return await key_admin.show_key(self.store, key_id)

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        with _mapped():
            return await key_admin.revoke_key(self.store, key_id, self.actor)

    async def rotate_key(self, key_id: str, overlap_s: float) -> IssuedKey:
        with _mapped():
            rec, full = await key_admin.rotate_key(self.store, key_id, self.actor, overlap_s)
        return IssuedKey(rec.key_id, full, key_admin.show(rec))

    async def get_policy(self) -> LivePolicy | None:
        with _mapped():
            stored = await self.store.get_policy()
        if stored is None:
            return None
        return LivePolicy(stored.version, stored.applied_at, stored.actor, json.loads(stored.doc))

    async def put_policy(self, text: str, expected_version: int | None) -> int:
        try:
            doc = policy_from_text(text, self.config)
        except ConfigError as exc:
            raise OperationError(400, str(exc)) from None
        with _mapped():
            try:
                return await store_policy(self.store, doc, self.actor, expected_version)
            except PolicyConflict as exc:
                raise OperationError(409, str(exc)) from None

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        try:
            limit = parse_limit(str(limit))
        except ValueError as exc:
            raise OperationError(400, str(exc)) from None
        with _mapped():
            events = await self.store.list_audit(since, limit)
        return [key_admin.with_iso_times(e, ("time",)) for e in events]

    async def _live_policy(self) -> CompiledPolicy | None:
        """The stored policy compiled as a gateway started now would install it; None when
        none is stored."""
        from gateway.policy import compile_stored

        stored = await self.store.get_policy()
        return None if stored is None else compile_stored(stored.doc, stored.version)

    async def report(self, since: str | None, reseller: str | None) -> dict[str, Any]:
        from gateway.screening import build_report

        with _mapped():
            return await build_report(self.store, await self._live_policy(), since, reseller)

    async def explain(self, query: ExplainQuery) -> dict[str, Any]:
        """Judged by a pipeline built here from the config and the stored keys and policy,
        as a gateway started now would judge it."""
        from gateway.decision import KeyScopes
        from gateway.explain import explain
        from gateway.geo import open_geo
        from gateway.identity import KeyRegistry
        from gateway.snapshot import Snapshot, build_config_parts

        s = self.config.settings
        with _mapped():
            geo = open_geo(s.geo, self.config.path, 0)
            registry = KeyRegistry(self.store)
            try:
                await registry.load_all()
                parts = build_config_parts(self.config)
                try:
                    policy = await self._live_policy()
                    return explain(Snapshot(parts, geo, registry, policy), KeyScopes(),
                                   query.ip, key=query.key,
                                   reseller=query.reseller, customer_ip=query.customer_ip,
                                   customer_id=query.customer_id, model=query.model,
                                   path=query.path or "/v1/messages", key_id=query.key_id,
                                   attestation=query.attestation, method=query.method,
                                   client_cert_sha256=query.client_cert_sha256)
                finally:
                    await parts.upstream.close()
            finally:
                geo.close()

    async def usage(self, query: UsageQuery) -> dict[str, Any]:
        from gateway.usage_report import read_report

        with _mapped():
            return await read_report(self.store, query,
                                     self.config.settings.usage.retention_days)


def policy_from_text(text: str, config: LoadedConfig) -> PolicyDoc:
    """A policy sent to be applied (YAML or JSON; duplicate keys refused, as in policy files),
    validated as a policy file is, and refused if a rule needs a geo database this gateway
    lacks (it would never fire). ConfigError names every problem."""
    from gateway.policy import require_databases, validate_policy

    doc = validate_policy(load_yaml(text, "request body"), "request body")
    require_databases(doc, config.settings.geo, "request body")
    return doc


@contextmanager
def _mapped() -> Iterator[None]:
    """Turn the store's errors into OperationError 503."""
    try:
        yield
    except StoreError as exc:
        raise OperationError(503, str(exc)) from None


@asynccontextmanager
async def direct_operations(config: LoadedConfig, actor: str
                            ) -> AsyncIterator[DirectOperations]:
    """DirectOperations on the configured store, started here and closed on exit."""
    from gateway.store import open_store

    s = config.settings.store
    store = open_store(s.url, s.key_prefix, max(s.timeout_s, 3.0))
    try:
        with _mapped():
            await store.start()
        yield DirectOperations(store, config, actor)
    finally:
        await store.close()


class AdminOperations:
    """The operations through the admin API of a running gateway at `admin_url` (e.g.
    `http://127.0.0.1:9090`), with the admin token; the gateway names the actor."""

    def __init__(self, admin_url: str, token: str) -> None:
        self.base = admin_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"}

    async def _call(self, method: str, path: str, *, json_body: Any = None,
                    text: str | None = None, params: dict[str, str] | None = None,
                    headers: dict[str, str] | None = None, missing_ok: bool = False) -> Any:
        """The JSON answer of one admin API call; OperationError for an error answer (None
        for a 404 when `missing_ok`) or an unreachable gateway."""
        try:
            async with aiohttp.ClientSession(headers=self.headers) as s, s.request(
                    method, self.base + path, json=json_body, data=text, params=params,
                    headers=headers) as r:
                try:
                    doc = await r.json(content_type=None)
                except ValueError:  # not JSON: no route of a gateway's admin API
                    doc = None
                if r.status == 404 and missing_ok:
                    return None
                if r.status >= 400:
                    err = doc.get("error") if isinstance(doc, dict) else None
                    message = err.get("message") if isinstance(err, dict) else None
                    raise OperationError(r.status, str(message or
                                                        f"admin API answered {r.status}"))
                return doc
        except aiohttp.ClientConnectorError:
            raise OperationError(503, f"cannot reach the gateway's admin API at {self.base} "
                                      "(the embedded store lives in the running gateway: "
                                      "start it with `gateway run`)") from None

    @staticmethod
    def _key(key_id: str) -> str:
        return "/admin/keys/" + quote(key_id, safe="")

    async def issue_key(self, spec: dict[str, Any]) -> IssuedKey:
        out = await self._call("POST", "/admin/keys", json_body=spec)
        return IssuedKey(out["key_id"], out["key"], out["record"])

    async def update_key(self, key_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("PATCH", self._key(key_id), json_body=changes)
        return out

    async def list_keys(self, reseller: str | None = None) -> list[dict[str, Any]]:
        out = await self._call("GET", "/admin/keys",
                               params={"reseller": reseller} if reseller else None)
        rows: list[dict[str, Any]] = out["keys"]
        return rows

    async def show_key(self, key_id: str) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("GET", self._key(key_id))
        return out

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("POST", self._key(key_id) + "/revoke")
        return out

    async def rotate_key(self, key_id: str, overlap_s: float) -> IssuedKey:
        out = await self._call("POST", self._key(key_id) + "/rotate",
                               json_body={"overlap_s": overlap_s})
        return IssuedKey(out["key_id"], out["key"], out["record"])

    async def get_policy(self) -> LivePolicy | None:
        out = await self._call("GET", "/admin/policy", missing_ok=True)
        if out is None:
            return None
        return LivePolicy(out["version"], out.get("applied_at"), out.get("actor"),
                          out["policy"])

    async def put_policy(self, text: str, expected_version: int | None) -> int:
        params = None if expected_version is None else {
            "expected_version": str(expected_version)}
        out = await self._call("PUT", "/admin/policy", text=text, params=params)
        version: int = out["version"]
        return version

    async def list_audit(self, since: float | None, limit: int) -> list[dict[str, Any]]:
        params = {"limit": str(limit), **({"since": repr(since)} if since is not None else {})}
        out = await self._call("GET", "/admin/audit", params=params)
        events: list[dict[str, Any]] = out["events"]
        return events

    async def explain(self, query: ExplainQuery) -> dict[str, Any]:
        params = {k: v for k, v in (
            ("ip", query.ip), ("reseller", query.reseller), ("customer_ip", query.customer_ip),
            ("customer_id", query.customer_id), ("model", query.model), ("path", query.path),
            ("key_id", query.key_id), ("attestation", query.attestation),
            ("method", query.method), ("client_cert_sha256", query.client_cert_sha256)) if v}
        # The full key goes in a header, never in the URL (access logs keep URLs).
        headers = {"x-explain-key": query.key} if query.key else None
        out: dict[str, Any] = await self._call("GET", "/admin/explain", params=params,
                                               headers=headers)
        return out

    async def report(self, since: str | None, reseller: str | None) -> dict[str, Any]:
        path = "/admin/report" + ("/" + quote(reseller, safe="") if reseller else "")
        out: dict[str, Any] = await self._call("GET", path,
                                               params={"since": since} if since else None)
        return out

    async def usage(self, query: UsageQuery) -> dict[str, Any]:
        out: dict[str, Any] = await self._call("GET", "/admin/usage", params=query.params())
        return out
