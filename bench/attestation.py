"""What the signed-attestation check costs per request: without the verification cache (every
request parses and verifies, as before it) and with it, for a header seen for the first time
and for one seen again.

    python -m bench.attestation [--requests 2000] [--rounds 5]

Times the decision's attestation step (`attest` in gateway/decision.py, what the live path
calls) for a reseller that requires signing, with `config/policy.yaml` and one Ed25519 key:
"no cache" judges one valid header over and over with `verifications=None`; "first sight"
judges N distinct valid headers (N timestamps) once each through a fresh cache, so every one
misses; "repeated" judges one valid header N times through a cache, so all but the first hit;
"forged, repeated" judges one bad signature N times, without and with the cache. Each figure is
the best of the rounds (taken in turn, so other load on the machine hits each alike), in µs
per request, with the ratios to "no cache".
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from gateway.attestation import Verifications, sign
from gateway.decision import attest
from gateway.errors import GatewayError
from gateway.policy import CompiledPolicy, compile_policy, validate_policy
from gateway.store.base import KeyRecord

POLICY = Path(__file__).resolve().parents[1] / "config" / "policy.yaml"
CID, CIP, METHOD, PATH = "cust-7", "175.16.199.1", "POST", "/v1/messages"
NOW = 1_764_000_000
KEY = KeyRecord(key_id="k1", reseller="acme", secret_hash="h")


def _policy(private: Ed25519PrivateKey) -> CompiledPolicy:
    doc = yaml.safe_load(POLICY.read_text())
    doc["resellers"]["acme"].update(
        attestation_key=private.public_key().public_bytes(
            Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode(),
        require_signed_attestation=True)
    return compile_policy(validate_policy(doc, str(POLICY)), 1)


def _per_request_us(policy: CompiledPolicy, claims: list[tuple[str, str]],
                    cache: Callable[[], Verifications | None]) -> float:
    """µs per `attest` of each (customer id, header) in turn, through `cache()` (made before
    the clock runs); a refusal counts like an answer."""
    verifications = cache()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for cid, header in claims:
            try:
                attest(policy, KEY, cid, CIP, header, METHOD, PATH, NOW, verifications)
            except GatewayError:
                pass
        return (time.perf_counter() - t0) / len(claims) * 1e6
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    private = Ed25519PrivateKey.generate()
    policy = _policy(private)
    good = [(CID, sign(private, CID, CIP, METHOD, PATH, NOW))] * a.requests
    forged = [(CID, sign(Ed25519PrivateKey.generate(), CID, CIP, METHOD, PATH, NOW))] * a.requests
    # as many customers as requests, each attested once
    distinct = [(f"cust-{i}", sign(private, f"cust-{i}", CIP, METHOD, PATH, NOW))
                for i in range(a.requests)]
    cases: dict[str, tuple[list[tuple[str, str]], Callable[[], Verifications | None]]] = {
        "valid, no cache (before)": (good, lambda: None),
        "valid, first sight": (distinct, Verifications),
        "valid, repeated": (good, Verifications),
        "forged, no cache (before)": (forged, lambda: None),
        "forged, repeated": (forged, Verifications),
    }
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(a.rounds):
        for name, (headers, cache) in cases.items():
            best[name] = min(best[name], _per_request_us(policy, headers, cache))
    print(f"attest() per signed request, best of {a.rounds} rounds of {a.requests}:")
    for name, us in best.items():
        base = best["forged, no cache (before)" if name.startswith("forged")
                    else "valid, no cache (before)"]
        print(f"  {name:<27} {us:8.2f} µs   {us / base:6.3f}x no cache")


if __name__ == "__main__":
    main()
