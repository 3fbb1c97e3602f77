"""Key operations (issue, update, list, show, revoke, rotate), shared by the admin API and the
CLI; each change is validated alike and audited (a line on stdout and an event in the store's
audit stream)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from gateway.audit import record_audit
from gateway.errors import OperationError
from gateway.identity import hash_secret, new_key
from gateway.paths import compile_path_globs
from gateway.policy import QUOTA_DIMENSIONS, QUOTA_PERIODS, glob_list
from gateway.store.base import DIMENSIONS, KeyRecord, Store

#: A key's own limits: the limit dimensions of the store.
LIMIT_FIELDS = DIMENSIONS
#: Fields `update_key` may change (the reseller never changes: issue a new key).
UPDATE_FIELDS = ("name", "models", "paths", "countries", "expires_at", "quotas",
                 *LIMIT_FIELDS)
#: Unix-time fields of a key as shown; each is also shown as `<field>_iso` (ISO 8601, UTC).
TIME_FIELDS = ("expires_at", "created_at", "updated_at", "last_used_at", "prev_valid_until")


def iso_time(ts: float | None) -> str | None:
    """ISO 8601 (UTC, whole seconds, `Z`) of a Unix time, as the CLI and admin API print
    times; None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_iso_times(doc: dict[str, Any], fields: tuple[str, ...] = TIME_FIELDS
                   ) -> dict[str, Any]:
    """`doc` with `<field>_iso` beside each numeric time field it holds."""
    for f in fields:
        if f in doc:
            v = doc[f]
            doc[f"{f}_iso"] = iso_time(v) if isinstance(v, int | float) else None
    return doc


def _strs(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise OperationError(400, f"{field} must be a list of strings")
    return list(value)


def _unbalanced_bracket(pattern: str) -> bool:
    """True when a '[' opens a class that never closes: fnmatch would match it literally,
    which is never what the operator meant (the same scan as fnmatch.translate)."""
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c != "[":
            continue
        j = i
        if j < n and pattern[j] == "!":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1
        while j < n and pattern[j] != "]":
            j += 1
        if j >= n:
            return True
        i = j + 1
    return False


def _models(value: Any) -> list[str]:
    models = _strs(value, "models")
    for m in models:
        if _unbalanced_bracket(m):
            raise OperationError(400, f"models: unbalanced '[' in the glob {m[:64]!r}")
    try:
        glob_list(models)  # the translation the gateway matches with
    except Exception as exc:  # re.error, whatever the translation refuses
        raise OperationError(400, f"models: not a valid glob: {exc}") from None
    return models


def _paths(value: Any) -> list[str]:
    paths = _strs(value, "paths")
    try:
        compile_path_globs(paths)  # segment-aware globs (docs/architecture.md §4)
    except ValueError as exc:
        raise OperationError(400, f"paths: {exc}") from None
    return paths


def _countries(value: Any) -> list[str]:
    countries = [c if c == "unknown" else c.upper() for c in _strs(value, "countries")]
    for c in countries:
        if c != "unknown" and (len(c) != 2 or not c.isalpha()):
            raise OperationError(400, f"{c!r} is not an ISO country code")
    return countries


def _limit(field: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise OperationError(400, f"{field} must be a non-negative integer")
    return v


def quota_name(name: str) -> str:
    """`name` if it names a quota, "<period>.<dimension>" as policy.QUOTA_NAMES does
    ("daily.output_tokens"); OperationError 400 naming the field and what is wrong with it
    (the period, the dimension) otherwise."""
    period, dot, dimension = name.partition(".")
    shown = f"quotas.{name[:64]}"
    if not dot or period not in QUOTA_PERIODS:
        raise OperationError(400, f"{shown}: unknown period {period[:64]!r} (a quota is "
                                  f"<period>.<dimension>; periods: "
                                  f"{', '.join(QUOTA_PERIODS)})")
    if dimension not in QUOTA_DIMENSIONS:
        raise OperationError(400, f"{shown}: unknown dimension {dimension[:64]!r} "
                                  f"(dimensions: {', '.join(QUOTA_DIMENSIONS)})")
    return name


def _quota_value(name: str, v: Any) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise OperationError(400, f"quotas.{name}: must be a non-negative integer")
    return v


def _quotas(value: Any, clearing: bool) -> dict[str, int | None]:
    """A key's own quotas from an object {"daily.output_tokens": N, ...}. With `clearing`
    (an update) a null value removes that quota (the policy's default applies again)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OperationError(400, "quotas must be an object like "
                                  "{\"daily.output_tokens\": 1000}")
    out: dict[str, int | None] = {}
    for name, v in value.items():
        quota_name(str(name))
        out[name] = None if v is None and clearing else _quota_value(name, v)
    return out


def _expires(v: Any, now: float) -> float:
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise OperationError(400, "expires_at must be a Unix time in seconds")
    if v <= now:
        raise OperationError(400, f"expires_at {iso_time(v)} is in the past")
    return float(v)


def _name(v: Any) -> str | None:
    if v is not None and not isinstance(v, str):
        raise OperationError(400, "name must be a string")
    return v


#: The validators of the key fields whose null means the empty value (no scope, no name).
_SCOPES: dict[str, Callable[[Any], Any]] = {
    "name": _name, "models": _models, "paths": _paths, "countries": _countries}


def _field(f: str, v: Any, now: float, *, clearing: bool) -> Any:
    """The value of the key field `f` as given (`v`), validated alike for an issue and an
    update: a scope or name as its validator makes it; else null stays null (no expiry, no
    quotas, the policy's default limit), and with `clearing` (an update) a null quota value
    removes that quota."""
    if f in _SCOPES:
        return _SCOPES[f](v)
    if v is None:
        return None
    if f == "expires_at":
        return _expires(v, now)
    if f == "quotas":
        return _quotas(v, clearing)
    return _limit(f, v)


async def _known_reseller(store: Store, reseller: str) -> None:
    """Refuse a reseller the live policy does not name (its keys could never be admitted)."""
    stored = await store.get_policy()
    if stored is None:
        raise OperationError(400, "no policy is stored yet: apply one (gateway policy apply "
                                  "FILE) before issuing keys")
    resellers = json.loads(stored.doc).get("resellers") or {}
    if reseller not in resellers:
        known = ", ".join(sorted(resellers)) or "none"
        raise OperationError(400, f"reseller {reseller[:64]!r} is not in the live policy "
                                  f"(version {stored.version}; resellers: {known})")


async def issue_key(store: Store, spec: dict[str, Any], actor: str) -> tuple[KeyRecord, str]:
    """Create a key from `spec` (reseller, name, models, paths, countries, limits fields,
    expires_at); return the record and the full key, which is shown this once only.

    Refused (OperationError 400): a reseller the live policy does not name, an expiry in the
    past, an invalid model or path glob (an unbalanced '[' included), unknown fields."""
    reseller = spec.get("reseller")
    if not isinstance(reseller, str) or not reseller:
        raise OperationError(400, "reseller is required")
    unknown = sorted(set(spec) - {"reseller", "limits", *UPDATE_FIELDS})
    if unknown:
        raise OperationError(400, f"unknown field(s): {', '.join(unknown)}")
    src = spec.get("limits") or {}
    if not isinstance(src, dict):
        raise OperationError(400, "limits must be an object")
    now = time.time()
    given = {f: spec.get(f, src.get(f)) if f in LIMIT_FIELDS else spec.get(f)
             for f in UPDATE_FIELDS}
    valid = {f: _field(f, value, now, clearing=False) for f, value in given.items()}
    limits = {f: valid[f] for f in LIMIT_FIELDS if valid[f] is not None}
    quotas = dict(sorted((valid["quotas"] or {}).items()))
    await _known_reseller(store, reseller)
    key_id, secret, full = new_key()
    rec = KeyRecord(
        key_id=key_id, reseller=reseller, secret_hash=hash_secret(secret), name=valid["name"],
        models=valid["models"], paths=valid["paths"], countries=valid["countries"], limits=limits,
        quotas=quotas, expires_at=valid["expires_at"], created_at=now, updated_at=now,
    )
    await store.put_key(rec)
    await record_audit(store, actor, "key_issued", key_id, reseller=reseller,
                       **({"quotas": quotas} if quotas else {}))
    return rec, full


async def update_key(store: Store, key_id: str, changes: dict[str, Any], actor: str
                     ) -> dict[str, Any]:
    """Change an active key's name, scopes (models, paths, countries), limits (rpm, itpm,
    otpm, concurrency), quotas or expiry, validated as `issue_key` validates them; null
    clears a field (no scope, the policy's default limit, no expiry). `quotas` is merged into
    the key's own: {"daily.requests": 100} sets that one, {"daily.requests": null} removes
    it, `"quotas": null` removes them all (the policy's `limits.key.quotas` apply again).
    Every instance applies it through the same change event as a revocation. Audited as
    `key_updated` with the changed fields; returns the key as shown."""
    if not changes:
        raise OperationError(400, f"nothing to update: give one of {', '.join(UPDATE_FIELDS)}")
    unknown = sorted(set(changes) - set(UPDATE_FIELDS))
    if unknown:
        extra = " (the reseller of a key never changes: issue a new key)" \
            if "reseller" in unknown else ""
        raise OperationError(400, f"cannot update field(s): {', '.join(unknown)}{extra}")
    now = time.time()
    new = {f: _field(f, v, now, clearing=True) for f, v in changes.items()}
    rec = await _get(store, key_id)
    if rec.status != "active":
        raise OperationError(409, f"key {key_id} is {rec.status}")
    if "quotas" in new:
        quotas = {} if new["quotas"] is None else dict(rec.quotas)
        for name, q in (new["quotas"] or {}).items():
            if q is None:
                quotas.pop(name, None)
            else:
                quotas[name] = q
        new["quotas"] = dict(sorted(quotas.items()))
    diff: dict[str, dict[str, Any]] = {}
    for f, v in new.items():
        old = rec.limits.get(f) if f in LIMIT_FIELDS else getattr(rec, f)
        if old == v:
            continue
        diff[f] = {"from": old, "to": v}
        if f in LIMIT_FIELDS:
            limits = dict(rec.limits)
            if v is None:
                limits.pop(f, None)
            else:
                limits[f] = v
            rec.limits = limits
        else:
            setattr(rec, f, v)
    if diff:
        rec.updated_at = now
        await store.put_key(rec)
        await record_audit(store, actor, "key_updated", key_id, reseller=rec.reseller,
                           fields=sorted(diff), changes=diff)
    return show(rec)


def show(rec: KeyRecord, last_used: float | None = None) -> dict[str, Any]:
    """A key as the CLI and admin API show it: no hashes, times also in ISO 8601."""
    out = rec.public()
    out["last_used_at"] = last_used
    return with_iso_times(out)


async def _get(store: Store, key_id: str) -> KeyRecord:
    rec = await store.get_key(key_id)
    if rec is None:
        raise OperationError(404, f"no key {key_id}")
    return rec


async def show_key(store: Store, key_id: str) -> dict[str, Any]:
    rec = await _get(store, key_id)
    return show(rec, (await store.last_used([key_id])).get(key_id))


async def list_keys(store: Store, reseller: str | None = None) -> list[dict[str, Any]]:
    recs = sorted(await store.list_keys(), key=lambda r: (r.reseller, r.created_at))
    if reseller:
        recs = [r for r in recs if r.reseller == reseller]
    used = await store.last_used([r.key_id for r in recs])
    return [show(r, used.get(r.key_id)) for r in recs]


async def revoke_key(store: Store, key_id: str, actor: str) -> dict[str, Any]:
    rec = await _get(store, key_id)
    rec.status = "revoked"
    rec.updated_at = time.time()
    rec.prev_secret_hash = None
    rec.prev_valid_until = None
    await store.put_key(rec)
    await record_audit(store, actor, "key_revoked", key_id, reseller=rec.reseller)
    return show(rec)


async def rotate_key(store: Store, key_id: str, actor: str, overlap_s: float = 3600.0
                     ) -> tuple[KeyRecord, str]:
    """New secret for the same key id; the old one keeps working for `overlap_s` seconds."""
    rec = await _get(store, key_id)
    if rec.status != "active":
        raise OperationError(409, f"key {key_id} is {rec.status}")
    if overlap_s < 0:
        raise OperationError(400, "overlap must be >= 0 seconds")
    _, secret, full = new_key(key_id)
    now = time.time()
    rec.prev_secret_hash = rec.secret_hash if overlap_s > 0 else None
    rec.prev_valid_until = now + overlap_s if overlap_s > 0 else None
    rec.secret_hash = hash_secret(secret)
    rec.updated_at = now
    await store.put_key(rec)
    await record_audit(store, actor, "key_rotated", key_id, reseller=rec.reseller,
                       overlap_s=overlap_s)
    return rec, full
