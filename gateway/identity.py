"""Reseller identity: scoped keys (`gk_<key_id>_<secret>`), their in-process snapshot, and
customer attestation.

Every instance keeps all key records in memory, updated by change events within a second and
re-read whole when the periodic version check sees a missed change; authenticating a request
never touches the store.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from gateway.client_ip import parse_addr
from gateway.errors import auth_error, invalid_request, permission_error
from gateway.lru import BoundedLRU
from gateway.store.base import KeyRecord, Store

KEY_RE = re.compile(r"^gk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
CUSTOMER_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def hash_secret(secret: str) -> str:
    """SHA-256 of a key secret (secrets are 256 random bits, so a fast hash is enough)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key(key_id: str | None = None) -> tuple[str, str, str]:
    """A fresh (key_id, secret, full key)."""
    kid = key_id or secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return kid, secret, f"gk_{kid}_{secret}"


def parse_key(value: str) -> tuple[str, str] | None:
    """(key_id, secret) of a well-formed key, else None."""
    m = KEY_RE.fullmatch(value)
    return (m.group(1), m.group(2)) if m else None


def extract_key(x_api_key: str | None, authorization: str | None) -> str | None:
    """The client's key from `x-api-key` or `Authorization: Bearer`."""
    if x_api_key:
        return x_api_key.strip()
    if authorization:
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


class KeyRegistry:
    """The snapshot of key records this instance authenticates against."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.keys: dict[str, KeyRecord] = {}
        self.epoch = -1
        self.last_used: dict[str, float] = {}
        self._digests: BoundedLRU[str, str] = BoundedLRU(4096)

    async def load_all(self) -> None:
        """Re-read every key record (start-up and missed-event resync)."""
        epoch, _ = await self.store.versions()
        self.keys = {r.key_id: r for r in await self.store.list_keys()}
        self.epoch = epoch

    async def refresh(self, key_id: str) -> None:
        """Re-read one key after a change event."""
        rec = await self.store.get_key(key_id)
        if rec is None:
            self.keys.pop(key_id, None)
        else:
            self.keys[key_id] = rec

    def authenticate(self, presented: str | None, now: float) -> KeyRecord:
        """The key record for a presented key, or the 401 GatewayError (docs/architecture.md §6)."""
        if not presented:
            raise auth_error("invalid_api_key", "missing API key")
        parsed = parse_key(presented)
        if parsed is None:
            raise auth_error("invalid_api_key", "malformed API key")
        key_id, secret = parsed
        rec = self.keys.get(key_id)
        if rec is None:
            raise auth_error("invalid_api_key", "unknown API key")
        digest = self._digests.get(secret)
        if digest is None:
            # Hashing costs more than the rest of authentication; remember digests of secrets
            # seen (bounded, least recently used out first: the secrets in use stay while an
            # attacker's random ones evict each other).
            digest = hash_secret(secret)
            self._digests.put(secret, digest)
        ok = hmac.compare_digest(digest, rec.secret_hash)
        if not ok and rec.prev_secret_hash and (rec.prev_valid_until or 0) > now:
            ok = hmac.compare_digest(digest, rec.prev_secret_hash)
        if not ok:
            raise auth_error("invalid_api_key", "unknown API key")
        check_usable(rec, now)
        self.last_used[key_id] = now
        return rec

    async def flush_last_used(self) -> None:
        """Write last-used times in one batch (off the request path)."""
        if self.last_used:
            batch, self.last_used = self.last_used, {}
            await self.store.touch_keys(batch)


def check_usable(rec: KeyRecord, now: float) -> None:
    """Refuse a known key that may not be used at `now`: the 401 `key_revoked` or
    `key_expired`, carrying the key's id and reseller for the log (never sent). Authentication
    and `gateway explain --key-id` judge a key by this one check."""
    if rec.status == "revoked":
        refusal = auth_error("key_revoked", "API key has been revoked")
    elif rec.expires_at is not None and rec.expires_at <= now:
        refusal = auth_error("key_expired", "API key has expired")
    else:
        return
    refusal.key_id, refusal.reseller = rec.key_id, rec.reseller
    raise refusal


@dataclass(frozen=True, slots=True)
class Attestation:
    customer_id: str | None
    customer_ip: str | None
    #: the verified `X-Customer-Attestation` signature (base64url), logged as `attestation_sig`
    signature: str | None = None


def parse_attestation(customer_id: str | None, customer_ip: str | None) -> Attestation:
    """Validate the reseller's customer headers; raise the 400 GatewayError when malformed.

    Only HTTP whitespace (space, tab) around a value is ignored."""
    cid = None
    if customer_id is not None:
        cid = customer_id.strip(" \t")
        if not CUSTOMER_ID_RE.fullmatch(cid):
            raise invalid_request("invalid_customer_attestation",
                                  "customer id must be 1-128 characters of [A-Za-z0-9._:@-]")
    cip = None
    if customer_ip is not None:
        raw = customer_ip.strip(" \t")
        # A bare address only: no port, brackets or zone id.
        cip = None if "[" in raw or raw.count(":") == 1 else parse_addr(raw)
        if cip is None:
            raise invalid_request("invalid_customer_attestation",
                                  "customer IP must be a single IPv4 or IPv6 address")
    return Attestation(cid, cip)


def require_customer(att: Attestation) -> None:
    if att.customer_id is None or att.customer_ip is None:
        raise permission_error("customer_attestation_required",
                               "this reseller must attest the customer "
                               "(X-Customer-Id and X-Customer-IP)")
