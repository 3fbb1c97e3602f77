"""Signed customer attestation (docs/architecture.md §13): a reseller registered with an Ed25519
public key signs each attestation in `X-Customer-Attestation: v1;ts=<unix seconds>;sig=<base64url
without padding>` over `customer_id|customer_ip|ts|method|path`.

Pure functions: parse the header, build the signed string, verify, load a public key (once per
policy version, in the compiled policy) and, for resellers and tests, sign; and `Verifications`,
the bounded cache of verification results the live path checks headers through.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import GatewayError, attestation_refused
from gateway.lru import BoundedLRU

#: The request header carrying the signed attestation.
ATTESTATION_HEADER = "X-Customer-Attestation"
#: How far `ts` may be from the gateway's clock, either way, in seconds.
MAX_SKEW_S = 300
#: An Ed25519 signature (64 bytes) in base64url without padding: 86 characters.
_HEADER_RE = re.compile(r"^v1;ts=([0-9]{1,12});sig=([A-Za-z0-9_-]{86})$")


@dataclass(frozen=True, slots=True)
class SignedAttestation:
    """A parsed `X-Customer-Attestation` value: `ts` as sent (its digits), the signature as
    sent (base64url) and decoded."""

    ts: str
    sig: str
    signature: bytes


def malformed(message: str) -> GatewayError:
    return attestation_refused("malformed", message)


def parse_header(value: str) -> SignedAttestation:
    """The parsed header value; the 403 `attestation_signature_malformed` GatewayError when it
    is not exactly `v1;ts=<digits>;sig=<86 base64url characters>` (HTTP whitespace around the
    whole value is ignored)."""
    m = _HEADER_RE.fullmatch(value.strip(" \t"))
    if m is None:
        raise malformed(f"{ATTESTATION_HEADER} must be v1;ts=<unix seconds>;sig=<base64url "
                        "Ed25519 signature without padding>")
    ts, sig = m.group(1), m.group(2)
    try:
        signature = base64.urlsafe_b64decode(sig + "==")
    except ValueError:  # pragma: no cover - the pattern admits base64url only
        raise malformed(f"{ATTESTATION_HEADER} signature is not base64url") from None
    if len(signature) != 64:  # pragma: no cover - 86 characters always decode to 64 bytes
        raise malformed(f"{ATTESTATION_HEADER} signature must be 64 bytes")
    return SignedAttestation(ts, sig, signature)


def signed_message(customer_id: str, customer_ip: str, ts: str, method: str,
                   path: str) -> bytes:
    """The signed string `customer_id|customer_ip|ts|method|path`, UTF-8."""
    return f"{customer_id}|{customer_ip}|{ts}|{method}|{path}".encode()


def verify(key: Ed25519PublicKey, att: SignedAttestation, customer_id: str, customer_ip: str,
           method: str, path: str, now: float) -> None:
    """Check the signature, then the time: the 403 `attestation_signature_invalid` when the
    signature does not verify for this customer, address, time, method and path under `key`;
    `attestation_signature_stale` when `ts` is more than MAX_SKEW_S from `now`."""
    _judge(_verifies(key, att, customer_id, customer_ip, method, path), int(att.ts), now)


def _verifies(key: Ed25519PublicKey, att: SignedAttestation, customer_id: str,
              customer_ip: str, method: str, path: str) -> bool:
    try:
        key.verify(att.signature, signed_message(customer_id, customer_ip, att.ts, method, path))
    except InvalidSignature:
        return False
    return True


def _judge(valid: bool, ts: int, now: float) -> None:
    if not valid:
        raise attestation_refused("invalid",
                                  "the customer attestation signature does not verify for this "
                                  "customer, address, time, method and path")
    if abs(now - ts) > MAX_SKEW_S:
        raise attestation_refused("stale",
                                  f"the customer attestation is more than {MAX_SKEW_S} s from "
                                  "the gateway's clock")


#: Verification results a process keeps (successes and failures alike).
CACHE_ENTRIES = 4096
#: A claim longer than this in all (characters: header, customer id and address, method, path)
#: is verified every time, never kept: an entry stays under about 1.5 KB, so the cache under
#: about 6 MB, even when requests carry 8 KB paths.
MAX_CACHED_CHARS = 1024


@dataclass(frozen=True, slots=True)
class _Result:
    valid: bool
    ts: int
    sig: str


class Verifications:
    """Ed25519 verification results (about 0.1 ms of CPU each) by exact input: the reseller,
    its public key's raw bytes, the header value as sent and the customer id, customer address,
    method and path it is judged with, which hold every byte of the signed string and the
    signature. The same signed string under the same key always gets the same answer, so
    successes and failures are kept alike (a flood of one bad signature costs one
    verification); a rotated key has other bytes, so it never reuses a result. Time is no part
    of a result: freshness is judged against the clock on every call, cached or not. At most
    `maxsize` entries (least recently used evicted; 0: none kept). One thread only, like the
    event loop that uses it."""

    __slots__ = ("_results",)

    def __init__(self, maxsize: int = CACHE_ENTRIES) -> None:
        self._results: BoundedLRU[tuple[str, bytes, str, str, str, str, str], _Result] = (
            BoundedLRU(maxsize))

    def check(self, reseller: str, key: Ed25519PublicKey, raw_key: bytes, header: str,
              customer_id: str, customer_ip: str, method: str, path: str, now: float) -> str:
        """The header's signature (base64url) when it verifies under `key` (`raw_key` its raw
        bytes) and its `ts` is within MAX_SKEW_S of `now`; otherwise the 403 GatewayError
        `parse_header` and `verify` raise: malformed, then invalid, then stale."""
        k = (reseller, raw_key, header, customer_id, customer_ip, method, path)
        result = self._results.get(k)
        if result is None:
            att = parse_header(header)
            result = _Result(_verifies(key, att, customer_id, customer_ip, method, path),
                             int(att.ts), att.sig)
            if (len(header) + len(customer_id) + len(customer_ip) + len(method) + len(path)
                    <= MAX_CACHED_CHARS):
                self._results.put(k, result)
        _judge(result.valid, result.ts, now)
        return result.sig

    def __len__(self) -> int:
        return len(self._results)


def load_public_key(pem: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM SubjectPublicKeyInfo; ValueError saying why not."""
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a PEM public key (SubjectPublicKeyInfo): {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"must be an Ed25519 public key, not {type(key).__name__}")
    return key


def sign(private_key: Ed25519PrivateKey, customer_id: str, customer_ip: str, method: str,
         path: str, ts: int) -> str:
    """The `X-Customer-Attestation` value a reseller sends (what its own code does)."""
    sig = private_key.sign(signed_message(customer_id, customer_ip, str(ts), method, path))
    return f"v1;ts={ts};sig={base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
