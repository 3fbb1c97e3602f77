"""Signed customer attestation (docs/architecture.md §13): a reseller registered with an Ed25519
public key signs each attestation in `X-Customer-Attestation: v1;ts=<unix seconds>;sig=<base64url
without padding>` over `customer_id|customer_ip|ts|method|path`.

Pure functions: parse the header, build the signed string, verify, load a public key (once per
policy version, in the compiled policy) and, for resellers and tests, sign.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.errors import GatewayError, attestation_refused

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
    try:
        key.verify(att.signature, signed_message(customer_id, customer_ip, att.ts, method, path))
    except InvalidSignature:
        raise attestation_refused("invalid",
                                  "the customer attestation signature does not verify for this "
                                  "customer, address, time, method and path") from None
    if abs(now - int(att.ts)) > MAX_SKEW_S:
        raise attestation_refused("stale",
                                  f"the customer attestation is more than {MAX_SKEW_S} s from "
                                  "the gateway's clock")


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
