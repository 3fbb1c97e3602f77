"""Key operations (issue, list, show, revoke, rotate), shared by the admin API and the CLI;
each change is audited (a line on stdout and an event in the store's audit stream)."""

from __future__ import annotations

import time
from typing import Any

from gateway.audit import record_audit
from gateway.identity import hash_secret, new_key
from gateway.paths import compile_path_globs
from gateway.store.base import KeyRecord, Store

LIMIT_FIELDS = ("rpm", "itpm", "otpm", "concurrency")


class KeyOpError(Exception):
    """A key operation that cannot be done (unknown key, bad field); `status` for HTTP."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _strs(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise KeyOpError(400, f"{field} must be a list of strings")
    return list(value)


async def issue_key(store: Store, spec: dict[str, Any], actor: str) -> tuple[KeyRecord, str]:
    """Create a key from `spec` (reseller, name, models, paths, countries, limits fields,
    expires_at); return the record and the full key, which is shown this once only."""
    reseller = spec.get("reseller")
    if not isinstance(reseller, str) or not reseller:
        raise KeyOpError(400, "reseller is required")
    known = {"reseller", "name", "models", "paths", "countries", "expires_at", "limits",
             *LIMIT_FIELDS}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise KeyOpError(400, f"unknown field(s): {', '.join(unknown)}")
    limits: dict[str, int] = {}
    src = spec.get("limits") or {}
    if not isinstance(src, dict):
        raise KeyOpError(400, "limits must be an object")
    for f in LIMIT_FIELDS:
        v = spec.get(f, src.get(f))
        if v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise KeyOpError(400, f"{f} must be a non-negative integer")
        limits[f] = v
    expires = spec.get("expires_at")
    if expires is not None and (not isinstance(expires, int | float) or isinstance(expires, bool)):
        raise KeyOpError(400, "expires_at must be a Unix time in seconds")
    countries = [c if c == "unknown" else c.upper() for c in _strs(spec.get("countries"),
                                                                    "countries")]
    for c in countries:
        if c != "unknown" and (len(c) != 2 or not c.isalpha()):
            raise KeyOpError(400, f"{c!r} is not an ISO country code")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise KeyOpError(400, "name must be a string")
    paths = _strs(spec.get("paths"), "paths")
    try:
        compile_path_globs(paths)  # segment-aware globs (docs/architecture.md §4)
    except ValueError as exc:
        raise KeyOpError(400, f"paths: {exc}") from None
    key_id, secret, full = new_key()
    now = time.time()
    rec = KeyRecord(
        key_id=key_id, reseller=reseller, secret_hash=hash_secret(secret), name=name,
        models=_strs(spec.get("models"), "models"), paths=paths,
        countries=countries, limits=limits,
        expires_at=float(expires) if expires is not None else None,
        created_at=now, updated_at=now,
    )
    await store.put_key(rec)
    await record_audit(store, actor, "key_issued", key_id, reseller=reseller)
    return rec, full


async def _get(store: Store, key_id: str) -> KeyRecord:
    rec = await store.get_key(key_id)
    if rec is None:
        raise KeyOpError(404, f"no key {key_id}")
    return rec


async def show_key(store: Store, key_id: str) -> dict[str, Any]:
    rec = await _get(store, key_id)
    out = rec.public()
    out["last_used_at"] = (await store.last_used([key_id])).get(key_id)
    return out


async def list_keys(store: Store, reseller: str | None = None) -> list[dict[str, Any]]:
    recs = sorted(await store.list_keys(), key=lambda r: (r.reseller, r.created_at))
    if reseller:
        recs = [r for r in recs if r.reseller == reseller]
    used = await store.last_used([r.key_id for r in recs])
    out = []
    for r in recs:
        d = r.public()
        d["last_used_at"] = used.get(r.key_id)
        out.append(d)
    return out


async def revoke_key(store: Store, key_id: str, actor: str) -> dict[str, Any]:
    rec = await _get(store, key_id)
    rec.status = "revoked"
    rec.updated_at = time.time()
    rec.prev_secret_hash = None
    rec.prev_valid_until = None
    await store.put_key(rec)
    await record_audit(store, actor, "key_revoked", key_id, reseller=rec.reseller)
    return rec.public()


async def rotate_key(store: Store, key_id: str, actor: str, overlap_s: float = 3600.0
                     ) -> tuple[KeyRecord, str]:
    """New secret for the same key id; the old one keeps working for `overlap_s` seconds."""
    rec = await _get(store, key_id)
    if rec.status != "active":
        raise KeyOpError(409, f"key {key_id} is {rec.status}")
    if overlap_s < 0:
        raise KeyOpError(400, "overlap must be >= 0 seconds")
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
