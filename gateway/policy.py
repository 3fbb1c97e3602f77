"""Policy: the docs/architecture.md §4 document, validated, compiled once per version into plain
lookups, and the one decision function used by the request path and by explain."""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway.attestation import load_public_key
from gateway.geo import ANONYMIZER_NAMES, GeoInfo
from gateway.paths import PathGlobs, compile_path_globs
from gateway.settings import ConfigError, GeoSettings, load_yaml, validation_error

_CC = re.compile(r"^[A-Z]{2}$")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHA256_COLONS = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){31}")


def normalize_fingerprint(value: str) -> str:
    """A certificate fingerprint as the policy keeps it: SHA-256 of the DER certificate in
    lowercase hex. Colon-separated pairs (`openssl x509 -fingerprint -sha256`: `AB:CD:…`)
    and upper case are accepted; anything else is a ValueError."""
    v = value.strip().lower()
    if _SHA256_HEX.fullmatch(v):
        return v
    if _SHA256_COLONS.fullmatch(v):
        return v.replace(":", "")
    raise ValueError(f"{value[:100]!r} is not a SHA-256 certificate fingerprint (64 hex "
                     "digits, or 32 colon-separated pairs)")


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _countries(v: list[str]) -> list[str]:
    out = []
    for c in v:
        cc = c if c == "unknown" else c.upper()
        if cc != "unknown" and not (c.isascii() and _CC.fullmatch(cc)):
            raise ValueError(f"{c!r} is not an ISO 3166 alpha-2 country code or 'unknown'")
        out.append(cc)
    return out


class LimitSet(_M):
    rpm: int | None = Field(default=None, ge=0)
    itpm: int | None = Field(default=None, ge=0)
    otpm: int | None = Field(default=None, ge=0)
    concurrency: int | None = Field(default=None, ge=0)


class QuotaSet(_M):
    """What a subject may use in one UTC calendar period (docs/architecture.md §12); a
    dimension left out is not limited."""

    requests: int | None = Field(default=None, ge=0)
    input_tokens: int | None = Field(default=None, ge=0)
    output_tokens: int | None = Field(default=None, ge=0)


class Quotas(_M):
    """`quotas: {daily: {...}, monthly: {...}}` on a reseller, or on `limits.key` (the default
    of every key)."""

    daily: QuotaSet = Field(default_factory=QuotaSet)
    monthly: QuotaSet = Field(default_factory=QuotaSet)

    def flat(self) -> dict[str, int]:
        """The quotas set, keyed as a key record keeps them: "daily.requests", ..."""
        out: dict[str, int] = {}
        for period in QUOTA_PERIODS:
            qs: QuotaSet = getattr(self, period)
            for dim in QUOTA_DIMENSIONS:
                v = getattr(qs, dim)
                if v is not None:
                    out[f"{period}.{dim}"] = v
        return out


def flat_quotas(q: Quotas | None) -> dict[str, int]:
    """`q.flat()`, or no quotas for None."""
    return {} if q is None else q.flat()


#: The quota periods and dimensions; a key record's `quotas` are keyed "<period>.<dimension>".
QUOTA_PERIODS = ("daily", "monthly")
QUOTA_DIMENSIONS = ("requests", "input_tokens", "output_tokens")
QUOTA_NAMES = tuple(f"{p}.{d}" for p in QUOTA_PERIODS for d in QUOTA_DIMENSIONS)
#: (period, dimension, "period.dimension") for each quota, built once (no f-string per request)
QUOTA_TRIPLES = tuple((p, d, f"{p}.{d}") for p in QUOTA_PERIODS for d in QUOTA_DIMENSIONS)


class Match(_M):
    country: list[str] | None = None
    not_country: list[str] | None = None
    asn: list[int | Literal["unknown"]] | None = None
    anonymizer: list[str] | None = None
    reseller: list[str] | None = None
    model: list[str] | None = None
    path: list[str] | None = None

    @field_validator("country", "not_country")
    @classmethod
    def _cc(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _countries(v)

    @field_validator("anonymizer")
    @classmethod
    def _anon(cls, v: list[str] | None) -> list[str] | None:
        for a in v or ():
            if a not in ANONYMIZER_NAMES:
                raise ValueError(f"{a!r} is not one of {', '.join(sorted(ANONYMIZER_NAMES))}")
        return v

    @field_validator("model", "path", "reseller", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("path")
    @classmethod
    def _path_globs(cls, v: list[str] | None) -> list[str] | None:
        # segment-aware globs (docs/architecture.md §4): a bad one is a config error
        compile_path_globs(v)
        return v


class Rule(_M):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    action: Literal["allow", "deny"]
    mode: Literal["enforce", "shadow"] = "enforce"
    reason: str | None = Field(default=None, pattern=r"^[a-z0-9_]{1,64}$")
    match: Match = Field(default_factory=Match)


class Reseller(_M):
    status: Literal["active", "suspended"] = "active"
    countries: list[str] | None = None
    require_customer: bool = False
    limits: LimitSet = Field(default_factory=LimitSet)
    customer_limits: LimitSet | None = None
    #: the reseller's keys are accepted only on a connection that presented one of these
    #: client certificates (SHA-256 of the DER certificate, kept in lowercase hex)
    client_cert_sha256: list[str] | None = None
    # None, not an empty set: a policy without quotas keeps its canonical JSON
    quotas: Quotas | None = None
    #: the reseller's Ed25519 public key (PEM SubjectPublicKeyInfo) for signed attestations
    attestation_key: str | None = None
    #: refuse this reseller's requests without a valid signed attestation (None: false, and
    #: out of the canonical JSON like `quotas`)
    require_signed_attestation: bool | None = None

    @field_validator("countries")
    @classmethod
    def _cc(cls, v: list[str] | None) -> list[str] | None:
        return None if v is None else _countries(v)

    @field_validator("attestation_key")
    @classmethod
    def _pem(cls, v: str | None) -> str | None:
        if v is not None:
            load_public_key(v)  # ValueError: a config error naming the field
        return v

    @field_validator("client_cert_sha256")
    @classmethod
    def _fingerprints(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("an empty list would refuse every key of the reseller; omit "
                             "the field for no binding")
        out: list[str] = []
        for fp in v:
            norm = normalize_fingerprint(fp)
            if norm not in out:
                out.append(norm)
        return out


class KeyLimitSet(LimitSet):
    """`limits.key`: the per-minute limits of every key, and its default quotas."""

    quotas: Quotas | None = None


class DefaultLimits(_M):
    key: KeyLimitSet = Field(default_factory=KeyLimitSet)
    reseller: LimitSet = Field(default_factory=LimitSet)
    customer: LimitSet = Field(default_factory=LimitSet)
    #: output reserved for a request that sends no `max_tokens` (docs/architecture.md §8)
    default_max_output_tokens: int = Field(default=4096, gt=0)


#: The screening signals (docs/architecture.md §15), in report order, with their default
#: (threshold, watch). Share signals are fractions 0-1; count signals a count N; denial_spike
#: a multiple k of the window's hourly mean.
SCREENING_DEFAULTS: dict[str, tuple[float, float]] = {
    "restricted_customer_share": (0.05, 0.01),
    "anonymizer_customer_share": (0.25, 0.10),
    "invalid_customer_ip_share": (0.05, 0.01),
    "customer_country_hopping": (4, 3),
    "shared_customer_ip": (10, 5),
    "activity_hours_mismatch": (0.5, 0.3),
    "egress_spread": (6, 4),
    "denial_spike": (5.0, 3.0),
}
SHARE_SIGNALS = frozenset({"restricted_customer_share", "anonymizer_customer_share",
                           "invalid_customer_ip_share", "activity_hours_mismatch"})
COUNT_SIGNALS = frozenset({"customer_country_hopping", "shared_customer_ip", "egress_spread"})
_WINDOW = re.compile(r"^(\d+)([hd])$")
MAX_SCREENING_HOURS = 7 * 24


def parse_window(text: Any) -> int:
    """The hours of a screening window written as whole hours or days (`24h`, `7d`), 1h to
    MAX_SCREENING_HOURS; ValueError for anything else."""
    m = _WINDOW.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("a window is whole hours or days, e.g. 24h or 7d")
    hours = int(m.group(1)) * (24 if m.group(2) == "d" else 1)
    if not 1 <= hours <= MAX_SCREENING_HOURS:
        raise ValueError(f"a window is 1h to {MAX_SCREENING_HOURS}h")
    return hours


class SignalLimits(_M):
    """`screening.<signal>`: flag at value >= threshold, watch at value >= watch."""

    threshold: float | None = Field(default=None, gt=0)
    watch: float | None = Field(default=None, gt=0)


class ScreeningActions(_M):
    """`screening.actions`: what a transition to `flag` does (docs/architecture.md §15)."""

    flag: Literal["alert", "suspend"] = "alert"
    mode: Literal["shadow", "enforce"] = "shadow"


class Screening(_M):
    """The policy's `screening:` section: the sliding window, per-signal limits, actions."""

    window: str = "24h"
    restricted_customer_share: SignalLimits = Field(default_factory=SignalLimits)
    anonymizer_customer_share: SignalLimits = Field(default_factory=SignalLimits)
    invalid_customer_ip_share: SignalLimits = Field(default_factory=SignalLimits)
    customer_country_hopping: SignalLimits = Field(default_factory=SignalLimits)
    shared_customer_ip: SignalLimits = Field(default_factory=SignalLimits)
    activity_hours_mismatch: SignalLimits = Field(default_factory=SignalLimits)
    egress_spread: SignalLimits = Field(default_factory=SignalLimits)
    denial_spike: SignalLimits = Field(default_factory=SignalLimits)
    actions: ScreeningActions = Field(default_factory=ScreeningActions)

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        parse_window(v)
        return v

    @property
    def window_hours(self) -> int:
        """The window in whole hours."""
        return parse_window(self.window)

    def limits(self, signal: str) -> tuple[float, float]:
        """(threshold, watch) of `signal`, the policy's or the default."""
        given: SignalLimits = getattr(self, signal)
        threshold, watch = SCREENING_DEFAULTS[signal]
        if given.threshold is not None:
            threshold = given.threshold
            watch = min(watch, threshold)
        if given.watch is not None:
            watch = given.watch
        return threshold, watch


DEFAULT_SCREENING = Screening()


def _check_screening(s: Screening, source: str) -> None:
    """Share thresholds are fractions; counts are whole; watch never above threshold."""
    errors: list[ConfigError] = []
    for name in SCREENING_DEFAULTS:
        given: SignalLimits = getattr(s, name)
        threshold, watch = s.limits(name)
        where = f"screening.{name}"
        for fld, v in (("threshold", given.threshold), ("watch", given.watch)):
            if v is None:
                continue
            if name in SHARE_SIGNALS and v > 1:
                errors.append(ConfigError(source, f"{where}.{fld}",
                                          "a share is a fraction from 0 to 1"))
            if name in COUNT_SIGNALS and v != int(v):
                errors.append(ConfigError(source, f"{where}.{fld}", "a count is whole"))
        if watch > threshold:
            errors.append(ConfigError(source, f"{where}.watch",
                                      f"watch {watch:g} is above threshold {threshold:g}"))
    if errors:
        raise ConfigError.of(errors)


class PolicyDoc(_M):
    version: Literal[1] = 1
    default_action: Literal["allow", "deny"] = "allow"
    rules: list[Rule] = Field(default_factory=list)
    resellers: dict[str, Reseller] = Field(default_factory=dict)
    limits: DefaultLimits = Field(default_factory=DefaultLimits)
    # None, not the defaults: a policy without screening keeps its canonical JSON
    screening: Screening | None = None

    @property
    def screening_or_default(self) -> Screening:
        """The `screening:` section, or the defaults when the policy has none."""
        return self.screening if self.screening is not None else DEFAULT_SCREENING


def _loc(loc: tuple[int | str, ...], raw: Any) -> str:
    """A readable field path; rules are named by id, not index."""
    parts: list[str] = []
    node = raw
    for p in loc:
        if parts and parts[-1] == "rules" and isinstance(p, int):
            rid = node[p].get("id") if isinstance(node, list) and p < len(node) and isinstance(
                node[p], dict) else None
            parts[-1] = f"rules[{rid if rid else p}]"
        else:
            parts.append(str(p))
        if isinstance(node, dict):
            node = node.get(p)
        elif isinstance(node, list) and isinstance(p, int) and p < len(node):
            node = node[p]
        else:
            node = None
    return ".".join(parts)


def validate_policy(raw: Any, source: str) -> PolicyDoc:
    """Validate a policy document; raise ConfigError naming source, rule id, field and reason."""
    if not isinstance(raw, dict):
        raise ConfigError(source, "", "policy must be a mapping")
    try:
        doc = PolicyDoc.model_validate(raw)
    except ValidationError as exc:
        raise validation_error(source, exc, lambda loc: _loc(loc, raw)) from None
    seen: set[str] = set()
    for rule in doc.rules:
        where = f"rules[{rule.id}]"
        if rule.id in seen:
            raise ConfigError(source, f"{where}.id", "duplicate rule id")
        seen.add(rule.id)
        if rule.action == "deny" and not rule.reason:
            raise ConfigError(source, f"{where}.reason", "a deny rule needs a reason code")
        if rule.action == "allow" and rule.mode == "shadow":
            raise ConfigError(source, f"{where}.mode", "shadow mode is for deny rules")
    for name, res in doc.resellers.items():
        if res.require_signed_attestation and res.attestation_key is None:
            raise ConfigError(source, f"resellers.{name}.require_signed_attestation",
                              f"needs resellers.{name}.attestation_key (the public key "
                              "to verify with)")
    if doc.screening is not None:
        _check_screening(doc.screening, source)
    return doc


def require_databases(doc: PolicyDoc, geo: GeoSettings, source: str) -> None:
    """Refuse a policy whose rules need a geo database the config does not name: without it
    an `anonymizer` rule never fires and an `asn` rule sees every address as unknown. Raises
    ConfigError naming every such rule."""
    errors = []
    for rule in doc.rules:
        for fld, setting, have in (("anonymizer", "geo.anonymous_ip_db", geo.anonymous_ip_db),
                                   ("asn", "geo.asn_db", geo.asn_db)):
            if getattr(rule.match, fld) is not None and not have:
                errors.append(ConfigError(source, f"rules[{rule.id}].match.{fld}",
                                          f"needs {setting}, which the gateway config does "
                                          "not set"))
    if errors:
        raise ConfigError.of(errors)


def load_policy_file(path: str) -> PolicyDoc:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from exc
    return validate_policy(load_yaml(text, path), path)


def canonical(doc: PolicyDoc) -> str:
    """The stored form: canonical JSON (what versions and diffs compare)."""
    return json.dumps(doc.model_dump(mode="json", exclude_none=True), sort_keys=True,
                      separators=(",", ":"))


# --- compiled form ---------------------------------------------------------------------------

def _glob(patterns: list[str] | None) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass(frozen=True, slots=True)
class CompiledRule:
    id: str
    action: str
    mode: str
    reason: str | None
    country: frozenset[str | None] | None
    not_country: frozenset[str | None] | None
    asn: frozenset[int | None] | None
    anonymizer: frozenset[str] | None
    reseller: frozenset[str] | None
    model: re.Pattern[str] | None
    path: PathGlobs | None
    has_location: bool

    def why_not(self, loc: GeoInfo | None, reseller: str | None, model: str | None,
                path: str) -> str | None:
        """None when the rule matches (for this location); else the first field that fails."""
        if self.reseller is not None and reseller not in self.reseller:
            return "reseller"
        if self.model is not None and (model is None or not self.model.match(model)):
            return "model"
        if self.path is not None and not self.path.match(path):
            return "path"
        if not self.has_location:
            return None
        if loc is None:
            return "no address"
        if self.country is not None and loc.country not in self.country:
            return "country"
        if self.not_country is not None and loc.country in self.not_country:
            return "not_country"
        if self.asn is not None and loc.asn not in self.asn:
            return "asn"
        if self.anonymizer is not None and not self.anonymizer.intersection(loc.anonymizer):
            return "anonymizer"
        return None


def _cc_set(v: list[str] | None) -> frozenset[str | None] | None:
    if v is None:
        return None
    return frozenset(None if c == "unknown" else c for c in v)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    version: int
    doc: PolicyDoc
    rules: tuple[CompiledRule, ...]
    reseller_countries: dict[str, frozenset[str | None] | None]
    shadow_ids: frozenset[str] = field(default_factory=frozenset)
    #: enforced deny rules that match on country: the restricted-region rules screening counts
    restricted_ids: frozenset[str] = field(default_factory=frozenset)
    #: some rule matches on the model: a request whose model cannot be read is refused
    model_rules: bool = False
    #: resellers' attestation public keys, loaded once per policy version
    attestation_keys: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    #: the same keys' raw bytes: what attestation verification results are cached under
    attestation_key_bytes: dict[str, bytes] = field(default_factory=dict)
    #: resellers bound to client certificates: their fingerprints (docs/architecture.md §5)
    client_certs: dict[str, frozenset[str]] = field(default_factory=dict)


def compile_stored(doc_json: str, version: int, source: str = "store",
                   geo: GeoSettings | None = None) -> CompiledPolicy:
    """A policy version as the store holds it (JSON), validated and compiled: what a gateway
    installs and what the CLI judges with. With `geo`, refused when a rule needs a database
    that config lacks (it would never fire). ConfigError (or ValueError: not JSON) says why."""
    doc = validate_policy(json.loads(doc_json), source)
    if geo is not None:
        require_databases(doc, geo, source)
    return compile_policy(doc, version)


def compile_policy(doc: PolicyDoc, version: int) -> CompiledPolicy:
    rules = []
    for r in doc.rules:
        m = r.match
        rules.append(CompiledRule(
            id=r.id, action=r.action, mode=r.mode, reason=r.reason,
            country=_cc_set(m.country), not_country=_cc_set(m.not_country),
            asn=None if m.asn is None else frozenset(
                None if a == "unknown" else int(a) for a in m.asn),
            anonymizer=None if m.anonymizer is None else frozenset(m.anonymizer),
            reseller=None if m.reseller is None else frozenset(m.reseller),
            model=_glob(m.model), path=compile_path_globs(m.path),
            has_location=any(x is not None for x in (m.country, m.not_country, m.asn,
                                                     m.anonymizer)),
        ))
    attestation_keys = {n: load_public_key(r.attestation_key)
                        for n, r in doc.resellers.items() if r.attestation_key}
    return CompiledPolicy(
        version=version, doc=doc, rules=tuple(rules),
        reseller_countries={n: _cc_set(r.countries) for n, r in doc.resellers.items()},
        shadow_ids=frozenset(r.id for r in doc.rules if r.mode == "shadow"),
        restricted_ids=frozenset(
            r.id for r in doc.rules if r.action == "deny" and r.mode == "enforce"
            and (r.match.country is not None or r.match.not_country is not None)),
        model_rules=any(r.match.model for r in doc.rules),
        attestation_keys=attestation_keys,
        attestation_key_bytes={n: k.public_bytes_raw() for n, k in attestation_keys.items()},
        client_certs={n: frozenset(r.client_cert_sha256) for n, r in doc.resellers.items()
                      if r.client_cert_sha256},
    )


# --- decision --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class RuleFacts:
    client: GeoInfo
    customer: GeoInfo | None
    reseller: str | None
    model: str | None
    path: str


@dataclass(slots=True)
class RuleDecision:
    action: str  # allow | deny
    rule: str | None
    reason: str | None
    shadow: list[str]
    trace: list[dict[str, Any]] | None = None


def evaluate_rules(policy: CompiledPolicy, inp: RuleFacts, trace: bool = False) -> RuleDecision:
    """Rules in order; the first enforced match decides; matching shadow rules are collected.

    Location fields are judged on the connecting client and on the attested customer: a rule
    matches when it matches either."""
    shadow: list[str] = []
    steps: list[dict[str, Any]] | None = [] if trace else None
    for r in policy.rules:
        miss = r.why_not(inp.client, inp.reseller, inp.model, inp.path)
        matched_on = "client" if miss is None else None
        if miss is not None and r.has_location and inp.customer is not None:
            cmiss = r.why_not(inp.customer, inp.reseller, inp.model, inp.path)
            if cmiss is None:
                matched_on = "customer"
        if steps is not None:
            steps.append({"rule": r.id, "action": r.action, "mode": r.mode,
                          "matched": matched_on is not None, "matched_on": matched_on,
                          "failed_field": None if matched_on else miss})
        if matched_on is None:
            continue
        if r.mode == "shadow":
            shadow.append(r.id)
            continue
        return RuleDecision(r.action, r.id, r.reason if r.action == "deny" else None, shadow,
                            steps)
    if policy.doc.default_action == "deny":
        return RuleDecision("deny", None, "default_deny", shadow, steps)
    return RuleDecision("allow", None, None, shadow, steps)


def country_allowed(allowed: frozenset[str | None] | None, country: str | None) -> bool:
    """An allow-list admits a country it names; unknown (None) only when it names `unknown`."""
    return allowed is None or country in allowed


def glob_list(patterns: list[str]) -> re.Pattern[str] | None:
    """Compiled model globs (fnmatch: `*` matches any characters); None for no scope."""
    return _glob(patterns)


def path_glob_list(patterns: list[str] | None) -> PathGlobs | None:
    """Compiled segment-aware path globs (`*` within a segment, `**` whole segments, see
    gateway.paths); None for no scope; ValueError for an invalid glob. Match the normalised
    path (gateway.paths.normalize_target) against it."""
    return compile_path_globs(patterns)
