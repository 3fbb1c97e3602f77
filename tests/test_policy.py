"""Tests for gateway.policy: validation errors, compilation and the rule decision function."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.geo import UNKNOWN, GeoInfo
from gateway.policy import (
    RuleDecision,
    RuleFacts,
    canonical,
    compile_policy,
    compile_stored,
    country_allowed,
    evaluate_rules,
    flat_quotas,
    glob_list,
    load_policy_file,
    parse_window,
    path_glob_list,
    validate_policy,
)
from gateway.settings import ConfigError, GeoSettings

REPO = Path(__file__).resolve().parents[1]
SRC = "policy.yaml"

US = GeoInfo("US", "US", 64500, "Example US", ())
GB = GeoInfo("GB", "GB", 64501, "Example GB", ())
CN = GeoInfo("CN", "CN", 64510, "Example CN", ())
RU = GeoInfo("RU", "RU", None, None, ())
NL_VPN = GeoInfo("NL", "NL", 64520, "VPN Co", ("vpn",))
US_HOSTING = GeoInfo("US", "US", 64521, "Cloud Co", ("hosting",))
US_TOR_HOSTING = GeoInfo("US", "US", 64521, "Cloud Co", ("tor", "hosting"))


def _deny(rule_id: str, mode: str = "enforce", **match: Any) -> dict[str, Any]:
    return {"id": rule_id, "action": "deny", "mode": mode, "reason": f"{rule_id}_denied".replace(
        "-", "_"), "match": match}


def _allow(rule_id: str, **match: Any) -> dict[str, Any]:
    return {"id": rule_id, "action": "allow", "match": match}


def _policy(rules: list[dict[str, Any]], default: str = "allow", **extra: Any) -> Any:
    doc = validate_policy({"version": 1, "default_action": default, "rules": rules, **extra}, SRC)
    return compile_policy(doc, 1)


def _inp(client: GeoInfo = US, customer: GeoInfo | None = None, reseller: str | None = "acme",
         model: str | None = "claude-sonnet-4-5", path: str = "/v1/messages") -> RuleFacts:
    return RuleFacts(client=client, customer=customer, reseller=reseller, model=model, path=path)


# --- validation ----------------------------------------------------------------------------------

GOOD: dict[str, Any] = {
    "version": 1,
    "default_action": "allow",
    "rules": [
        {"id": "restricted-regions", "action": "deny", "mode": "enforce",
         "reason": "unsupported_country_region_territory", "match": {"country": ["CN", "RU"]}},
        {"id": "anonymizers", "action": "deny", "reason": "anonymizer_not_allowed",
         "match": {"anonymizer": ["vpn", "tor"]}},
    ],
    "resellers": {"acme": {"status": "active", "countries": ["US", "GB"],
                           "limits": {"rpm": 10}}},
    "limits": {"key": {"rpm": 600}},
}


def _bad(mutate: Any) -> dict[str, Any]:
    raw = copy.deepcopy(GOOD)
    mutate(raw)
    return raw


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        pytest.param(_bad(lambda d: d["rules"][0].update(colour="red")),
                     "rules[restricted-regions].colour", "unknown field", id="unknown-rule-field"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(continent=["AS"])),
                     "rules[restricted-regions].match.continent", "unknown field",
                     id="unknown-match-field"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(country=["CN", "CHN"])),
                     "rules[restricted-regions].match.country", "'CHN' is not an ISO 3166",
                     id="bad-country"),
        pytest.param(_bad(lambda d: d["rules"][1]["match"].update(not_country=["U1"])),
                     "rules[anonymizers].match.not_country", "'U1' is not an ISO 3166",
                     id="bad-not-country"),
        pytest.param(_bad(lambda d: d["rules"][1]["match"].update(anonymizer=["vpn", "icloud"])),
                     "rules[anonymizers].match.anonymizer", "'icloud' is not one of",
                     id="bad-anonymizer"),
        pytest.param(_bad(lambda d: d["rules"][1].update(id="restricted-regions")),
                     "rules[restricted-regions].id", "duplicate rule id", id="duplicate-id"),
        pytest.param(_bad(lambda d: d["rules"][0].pop("reason")),
                     "rules[restricted-regions].reason", "a deny rule needs a reason",
                     id="deny-without-reason"),
        pytest.param(_bad(lambda d: d["rules"].append(
                         {"id": "try-allow", "action": "allow", "mode": "shadow"})),
                     "rules[try-allow].mode", "shadow mode is for deny rules", id="shadow-allow"),
        pytest.param(_bad(lambda d: d["rules"][0].update(action="block")),
                     "rules[restricted-regions].action", "'allow' or 'deny'", id="wrong-action"),
        pytest.param(_bad(lambda d: d["rules"][0].update(mode="audit")),
                     "rules[restricted-regions].mode", "'enforce' or 'shadow'", id="wrong-mode"),
        pytest.param(_bad(lambda d: d["resellers"]["acme"].update(status="paused")),
                     "resellers.acme.status", "'active' or 'suspended'",
                     id="bad-reseller-status"),
        pytest.param(_bad(lambda d: d["resellers"]["acme"].update(countries=["usa"])),
                     "resellers.acme.countries", "'usa' is not an ISO 3166",
                     id="bad-reseller-country"),
        pytest.param(_bad(lambda d: d["limits"]["key"].update(rpm=-1)),
                     "limits.key.rpm", "greater than or equal to 0", id="negative-limit"),
        pytest.param(_bad(lambda d: d["resellers"]["acme"]["limits"].update(concurrency=-5)),
                     "resellers.acme.limits.concurrency", "greater than or equal to 0",
                     id="negative-reseller-limit"),
        pytest.param(_bad(lambda d: d.update(default_action="maybe")),
                     "default_action", "'allow' or 'deny'", id="bad-default-action"),
        pytest.param(_bad(lambda d: d.update(version=2)), "version", "1", id="bad-version"),
        pytest.param(_bad(lambda d: d.update(extras=True)), "extras", "unknown field",
                     id="unknown-top-level"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(path=["/v1/[abc"])),
                     "rules[restricted-regions].match.path", "unbalanced '['",
                     id="unbalanced-path-glob"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(path="/v1/messages**")),
                     "rules[restricted-regions].match.path", "whole path segment",
                     id="double-star-inside-segment"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(path=["v1/*"])),
                     "rules[restricted-regions].match.path", "starts with '/'",
                     id="relative-path-glob"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(country=["CN\n"])),
                     "rules[restricted-regions].match.country", "is not an ISO 3166",
                     id="country-with-newline"),
        pytest.param(_bad(lambda d: d["rules"][0]["match"].update(country=["\u00df"])),
                     "rules[restricted-regions].match.country", "is not an ISO 3166",
                     id="country-upper-cases-to-two-letters"),
    ],
)
def test_validate_policy_errors(raw: dict[str, Any], field: str, reason: str) -> None:
    """An invalid policy raises ConfigError naming the source, the rule by id, the field and why."""
    with pytest.raises(ConfigError) as info:
        validate_policy(raw, SRC)
    err = info.value
    assert err.file == SRC
    assert err.field == field
    assert reason in err.reason
    assert SRC in str(err) and field in str(err) and reason in str(err)


BAD_POLICIES = REPO / "tests" / "fixtures" / "bad_config" / "policies"


@pytest.mark.parametrize(("name", "field", "reason"), [
    ("negative_quota.yaml", "resellers.acme.quotas.daily.requests",
     "greater than or equal to 0"),
    ("unknown_quota_period.yaml", "limits.key.quotas.weekly", "unknown field"),
    ("quota_not_integer.yaml", "limits.key.quotas.monthly.output_tokens", "valid integer"),
    ("reseller_default_quotas.yaml", "limits.reseller.quotas", "unknown field"),
])
def test_bad_quota_policy_fixture(name: str, field: str, reason: str) -> None:
    """A policy file with a bad quota is a config error naming the file, the field path and
    the reason."""
    path = str(BAD_POLICIES / name)
    with pytest.raises(ConfigError) as info:
        load_policy_file(path)
    assert (info.value.file, info.value.field) == (path, field)
    assert reason in info.value.reason


def test_quotas_parse_on_resellers_and_key_defaults() -> None:
    """`resellers.R.quotas` and `limits.key.quotas` parse into daily and monthly sets, flat as
    a key record keeps them; the key default keeps its per-minute limits beside them."""
    doc = validate_policy({"resellers": {"acme": {"quotas": {
        "daily": {"requests": 0}, "monthly": {"input_tokens": 5, "output_tokens": 7}}}},
        "limits": {"key": {"rpm": 3, "quotas": {"daily": {"output_tokens": 9}}}}}, SRC)
    assert doc.resellers["acme"].quotas is not None
    assert doc.resellers["acme"].quotas.flat() == {
        "daily.requests": 0, "monthly.input_tokens": 5, "monthly.output_tokens": 7}
    assert flat_quotas(doc.limits.key.quotas) == {"daily.output_tokens": 9}
    assert doc.limits.key.rpm == 3
    assert flat_quotas(validate_policy({}, SRC).limits.key.quotas) == {}


def test_a_policy_without_quotas_keeps_its_canonical_form() -> None:
    """Quotas left out are not written into the canonical JSON, so a policy stored before
    quotas existed compares equal to the same file read now."""
    doc = validate_policy({"resellers": {"acme": {"limits": {"rpm": 5}}},
                           "limits": {"key": {"rpm": 3}}}, SRC)
    assert "quotas" not in canonical(doc)


def test_validate_policy_rule_without_id_is_named_by_index() -> None:
    """A rule whose id is missing is named by its position."""
    raw = _bad(lambda d: d["rules"][1].pop("id"))
    with pytest.raises(ConfigError) as info:
        validate_policy(raw, SRC)
    assert info.value.field == "rules[1].id"


def test_validate_policy_names_every_problem_as_the_config_loader_does() -> None:
    """Every schema problem of a policy is reported, in order, in the config loader's words
    (the one translation of settings.validation_error)."""
    raw = _bad(lambda d: (d["rules"][0].update(colour="red"), d["rules"][1].pop("id"),
                          d["limits"]["key"].update(rpm=-1)))
    with pytest.raises(ConfigError) as info:
        validate_policy(raw, SRC)
    assert [(p.file, p.field, p.reason) for p in info.value.problems] == [
        (SRC, "rules[restricted-regions].colour", "unknown field"),
        (SRC, "rules[1].id", "required field is missing"),
        (SRC, "limits.key.rpm", "Input should be greater than or equal to 0"),
    ]
    assert str(info.value).count("\n") == 2


@pytest.mark.parametrize("raw", [None, [], "policy", 3])
def test_validate_policy_not_a_mapping(raw: Any) -> None:
    """A policy document that is not a mapping is refused."""
    with pytest.raises(ConfigError, match="must be a mapping"):
        validate_policy(raw, SRC)


def test_validate_policy_normalises_country_case() -> None:
    """Country codes are upper-cased; `unknown` stays as written."""
    doc = validate_policy({"rules": [_deny("r", country=["cn", "unknown"])]}, SRC)
    assert doc.rules[0].match.country == ["CN", "unknown"]


def test_path_glob_list_is_segment_aware_and_validated() -> None:
    """Key path scopes: '*' stays in a segment, '**' spans segments, a bad glob raises."""
    globs = path_glob_list(["/v1/messages*"])
    assert globs is not None
    assert globs.match("/v1/messages") and not globs.match("/v1/messages/../models")
    assert not globs.match("/v1/messages/batches")
    assert path_glob_list([]) is None
    with pytest.raises(ValueError, match="unbalanced"):
        path_glob_list(["/v1/[x"])


def test_model_globs_keep_fnmatch_semantics() -> None:
    """Model globs are not paths: '*' matches any characters, '/' included."""
    globs = glob_list(["org/*"])
    assert globs is not None and globs.match("org/team/model")


def test_load_repo_policy_file() -> None:
    """The repository's config/policy.yaml is valid."""
    doc = load_policy_file(str(REPO / "config" / "policy.yaml"))
    assert doc.version == 1
    assert [r.id for r in doc.rules][:1] == ["restricted-regions"]
    assert "acme" in doc.resellers


def test_load_policy_file_missing_and_not_yaml(tmp_path: Path) -> None:
    """A missing file or broken YAML raises ConfigError naming the file."""
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_policy_file(str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("rules: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_policy_file(str(broken))


# --- evaluation ----------------------------------------------------------------------------------


def test_first_enforced_match_decides() -> None:
    """Rules are judged in order and the first enforced match decides."""
    policy = _policy([_allow("allow-gb", country=["GB"]), _deny("no-gb", country=["GB"]),
                      _deny("no-us", country=["US"])])
    assert evaluate_rules(policy, _inp(GB)) == RuleDecision("allow", "allow-gb", None, [])
    assert evaluate_rules(policy, _inp(US)) == RuleDecision("deny", "no-us", "no_us_denied", [])
    assert evaluate_rules(policy, _inp(CN)) == RuleDecision("allow", None, None, [])


def test_shadow_matches_are_collected_and_never_block() -> None:
    """Matching shadow rules are listed in order and never decide."""
    policy = _policy([
        _deny("shadow-us", mode="shadow", country=["US"]),
        _deny("shadow-hosting", mode="shadow", anonymizer=["hosting"]),
        _deny("shadow-cn", mode="shadow", country=["CN"]),
        _deny("no-tor", anonymizer=["tor"]),
    ])
    assert evaluate_rules(policy, _inp(US_HOSTING)) == RuleDecision(
        "allow", None, None, ["shadow-us", "shadow-hosting"])
    assert evaluate_rules(policy, _inp(US_TOR_HOSTING)) == RuleDecision(
        "deny", "no-tor", "no_tor_denied", ["shadow-us", "shadow-hosting"])
    assert policy.shadow_ids == frozenset({"shadow-us", "shadow-hosting", "shadow-cn"})


def test_shadow_after_deciding_rule_is_not_reached() -> None:
    """A shadow rule after the deciding rule is not evaluated."""
    policy = _policy([_deny("no-us", country=["US"]),
                      _deny("shadow-us", mode="shadow", country=["US"])])
    assert evaluate_rules(policy, _inp(US)).shadow == []


def test_default_deny() -> None:
    """With default_action deny and no match, the reason is default_deny."""
    policy = _policy([_allow("allow-us", country=["US"])], default="deny")
    assert evaluate_rules(policy, _inp(GB)) == RuleDecision("deny", None, "default_deny", [])
    assert evaluate_rules(policy, _inp(US)) == RuleDecision("allow", "allow-us", None, [])


@pytest.mark.parametrize(
    ("match", "loc", "matched"),
    [
        # country, unknown
        ({"country": ["CN"]}, CN, True),
        ({"country": ["CN"]}, US, False),
        ({"country": ["CN"]}, UNKNOWN, False),
        ({"country": ["unknown"]}, UNKNOWN, True),
        ({"country": ["unknown"]}, GeoInfo(None, None, 1, None, ()), True),
        ({"country": ["unknown"]}, US, False),
        ({"country": ["cn", "ru"]}, RU, True),
        # not_country
        ({"not_country": ["US", "GB"]}, CN, True),
        ({"not_country": ["US", "GB"]}, GB, False),
        ({"not_country": ["US"]}, UNKNOWN, True),
        ({"not_country": ["US", "unknown"]}, UNKNOWN, False),
        # asn
        ({"asn": [64500]}, US, True),
        ({"asn": [64500]}, GB, False),
        ({"asn": [64500, "unknown"]}, RU, True),
        ({"asn": ["unknown"]}, US, False),
        ({"asn": [64500]}, UNKNOWN, False),
        # anonymizer
        ({"anonymizer": ["vpn", "tor"]}, NL_VPN, True),
        ({"anonymizer": ["tor"]}, US_TOR_HOSTING, True),
        ({"anonymizer": ["tor"]}, NL_VPN, False),
        ({"anonymizer": ["vpn"]}, UNKNOWN, False),
        # AND across fields, OR within
        ({"country": ["US", "NL"], "anonymizer": ["vpn"]}, NL_VPN, True),
        ({"country": ["US", "NL"], "anonymizer": ["vpn"]}, US, False),
        ({"country": ["US"], "asn": [64500, 64521], "anonymizer": ["hosting"]}, US_HOSTING, True),
        ({"country": ["US"], "asn": [64500], "anonymizer": ["hosting"]}, US_HOSTING, False),
        ({"not_country": ["CN"], "asn": [64501]}, GB, True),
        # empty match: everything
        ({}, UNKNOWN, True),
    ],
)
def test_location_match_fields(match: dict[str, Any], loc: GeoInfo, matched: bool) -> None:
    """Location fields: values within a field are OR-ed, fields are AND-ed, `unknown` is None."""
    policy = _policy([_deny("r", **match)])
    got = evaluate_rules(policy, _inp(loc))
    assert (got.rule == "r") is matched
    assert got.action == ("deny" if matched else "allow")


@pytest.mark.parametrize(
    ("match", "inp", "matched"),
    [
        ({"model": ["claude-*"]}, _inp(model="claude-sonnet-4-5"), True),
        ({"model": "claude-*"}, _inp(model="claude-sonnet-4-5"), True),
        ({"model": ["claude-*"]}, _inp(model="gpt-4o"), False),
        ({"model": ["claude-*", "gpt-4?"]}, _inp(model="gpt-4o"), True),
        ({"model": ["claude-*"]}, _inp(model=None), False),
        ({"model": ["claude-opus-*"]}, _inp(model="claude-opus-4-1-20250805"), True),
        ({"model": ["claude"]}, _inp(model="claude-sonnet"), False),
        ({"path": ["/v1/messages*"]}, _inp(path="/v1/messages/count_tokens"), False),
        ({"path": ["/v1/messages*"]}, _inp(path="/v1/messages"), True),
        ({"path": ["/v1/messages/**"]}, _inp(path="/v1/messages/count_tokens"), True),
        ({"path": ["/v1/messages/**"]}, _inp(path="/v1/messages"), True),
        ({"path": ["/v1/*"]}, _inp(path="/v1/messages/batches"), False),
        ({"path": ["/v1/chat/*"]}, _inp(path="/v1/messages"), False),
        ({"path": "/v1/models"}, _inp(path="/v1/models"), True),
        ({"reseller": ["acme", "globex"]}, _inp(reseller="acme"), True),
        ({"reseller": "acme"}, _inp(reseller="acme"), True),
        ({"reseller": ["globex"]}, _inp(reseller="acme"), False),
        ({"reseller": ["acme"]}, _inp(reseller=None), False),
        ({"reseller": ["acme"], "model": ["gpt-*"]}, _inp(reseller="acme", model="gpt-4o"), True),
        ({"reseller": ["acme"], "model": ["gpt-*"]}, _inp(reseller="acme"), False),
        ({"reseller": ["acme"], "country": ["CN"]}, _inp(client=CN, reseller="acme"), True),
        ({"reseller": ["acme"], "country": ["CN"]}, _inp(client=CN, reseller="other"), False),
    ],
)
def test_request_match_fields(match: dict[str, Any], inp: RuleFacts, matched: bool) -> None:
    """Model and path are globs, reseller is a set; all are AND-ed with location fields."""
    policy = _policy([_deny("r", **match)])
    assert (evaluate_rules(policy, inp).rule == "r") is matched


def test_customer_location_is_judged_too() -> None:
    """A US client attesting a CN customer is denied, and the trace says it matched on customer."""
    policy = _policy([_deny("restricted", country=["CN"])])
    got = evaluate_rules(policy, _inp(client=US, customer=CN), trace=True)
    assert (got.action, got.rule, got.reason) == ("deny", "restricted", "restricted_denied")
    assert got.trace == [{"rule": "restricted", "action": "deny", "mode": "enforce",
                          "matched": True, "matched_on": "customer", "failed_field": None}]


def test_customer_anonymizer_and_client_match() -> None:
    """Either address matching counts; the client is named when it matches itself."""
    policy = _policy([_deny("anon", anonymizer=["vpn"])])
    on_client = evaluate_rules(policy, _inp(client=NL_VPN, customer=US), trace=True)
    assert on_client.trace is not None and on_client.trace[0]["matched_on"] == "client"
    on_customer = evaluate_rules(policy, _inp(client=US, customer=NL_VPN), trace=True)
    assert on_customer.trace is not None and on_customer.trace[0]["matched_on"] == "customer"
    neither = evaluate_rules(policy, _inp(client=US, customer=GB), trace=True)
    assert neither.action == "allow"
    assert neither.trace is not None and neither.trace[0]["failed_field"] == "anonymizer"


def test_location_fields_are_judged_per_address() -> None:
    """AND across location fields holds within one address, not across client and customer."""
    policy = _policy([_deny("cn-vpn", country=["CN"], anonymizer=["vpn"])])
    assert evaluate_rules(policy, _inp(client=CN, customer=NL_VPN)).action == "allow"


def test_customer_does_not_rescue_non_location_rules() -> None:
    """A rule without location fields is judged on the request alone."""
    policy = _policy([_deny("gpt", model=["gpt-*"])])
    assert evaluate_rules(policy, _inp(customer=CN, model="claude-x")).action == "allow"


def test_trace_records_every_rule_until_the_decision() -> None:
    """The trace lists each evaluated rule with whether it matched and the failed field."""
    policy = _policy([
        _deny("no-cn", country=["CN"]),
        _deny("gpt-only", model=["gpt-*"]),
        _deny("shadow-us", mode="shadow", country=["US"]),
        _deny("acme-us", reseller=["acme"], country=["US"]),
        _deny("never", country=["RU"]),
    ])
    got = evaluate_rules(policy, _inp(client=US), trace=True)
    assert (got.rule, got.shadow) == ("acme-us", ["shadow-us"])
    assert got.trace == [
        {"rule": "no-cn", "action": "deny", "mode": "enforce", "matched": False,
         "matched_on": None, "failed_field": "country"},
        {"rule": "gpt-only", "action": "deny", "mode": "enforce", "matched": False,
         "matched_on": None, "failed_field": "model"},
        {"rule": "shadow-us", "action": "deny", "mode": "shadow", "matched": True,
         "matched_on": "client", "failed_field": None},
        {"rule": "acme-us", "action": "deny", "mode": "enforce", "matched": True,
         "matched_on": "client", "failed_field": None},
    ]


def test_no_trace_unless_asked() -> None:
    """Without trace=True the decision carries no trace."""
    assert evaluate_rules(_policy([_deny("r", country=["US"])]), _inp(US)).trace is None


def test_repo_policy_decisions() -> None:
    """The repository policy denies restricted regions and VPNs, and shadows hosting."""
    policy = compile_policy(load_policy_file(str(REPO / "config" / "policy.yaml")), 1)
    assert evaluate_rules(policy, _inp(CN)).reason == "unsupported_country_region_territory"
    assert evaluate_rules(policy, _inp(US, customer=RU)).rule == "restricted-regions"
    assert evaluate_rules(policy, _inp(NL_VPN)).reason == "anonymizer_not_allowed"
    hosting = evaluate_rules(policy, _inp(US_HOSTING))
    assert (hosting.action, hosting.shadow) == ("allow", ["hosting-providers"])
    assert evaluate_rules(policy, _inp(US)) == RuleDecision("allow", None, None, [])
    assert policy.reseller_countries["direct"] is not None
    assert None in policy.reseller_countries["direct"]


# --- country_allowed -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "country", "ok"),
    [
        (None, "CN", True),
        (None, None, True),
        (frozenset({"US", "GB"}), "US", True),
        (frozenset({"US", "GB"}), "CN", False),
        (frozenset({"US", "GB"}), None, False),
        (frozenset({"US", None}), None, True),
        (frozenset(), "US", False),
    ],
)
def test_country_allowed(allowed: frozenset[str | None] | None, country: str | None,
                         ok: bool) -> None:
    """No list admits everything; unknown is outside a list unless it names `unknown`."""
    assert country_allowed(allowed, country) is ok


def test_reseller_country_lists_compile_unknown_to_none() -> None:
    """A reseller's `unknown` country compiles to None so country_allowed admits unknown."""
    policy = _policy([], resellers={"acme": {"countries": ["us", "unknown"]},
                                    "open": {}})
    assert policy.reseller_countries == {"acme": frozenset({"US", None}), "open": None}
    assert country_allowed(policy.reseller_countries["acme"], None)
    assert not country_allowed(policy.reseller_countries["acme"], "CN")


def test_policy_validate_cli_needs_no_secrets(tmp_path: Path) -> None:
    """`gateway policy validate FILE` checks a file with no config secrets in the environment:
    exit 0 on the example, 2 with the rule and field named on a broken copy."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("GATEWAY_ADMIN_TOKEN", "UPSTREAM_API_KEY")}
    ok = subprocess.run([sys.executable, "-m", "gateway", "policy", "validate",
                         str(REPO / "config" / "policy.yaml")], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "ok" in ok.stdout, ok.stderr
    broken = tmp_path / "policy.yaml"
    broken.write_text((REPO / "config" / "policy.yaml").read_text().replace(
        "country: [CN,", "country: [CHN,"))
    bad = subprocess.run([sys.executable, "-m", "gateway", "policy", "validate", str(broken)],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "rules[restricted-regions].match.country" in bad.stderr
    assert "CHN" in bad.stderr


FP = "ab" * 32


def test_client_cert_fingerprints_are_normalised_and_compiled() -> None:
    """`client_cert_sha256` keeps lowercase hex: colon-separated upper case (openssl's form)
    and upper-case hex are normalised, duplicates dropped; only bound resellers compile."""
    colons = ":".join(["AB"] * 32)
    doc = validate_policy({"resellers": {
        "bound": {"client_cert_sha256": [colons, FP.upper(), "cd" * 32]},
        "free": {}}}, SRC)
    assert doc.resellers["bound"].client_cert_sha256 == [FP, "cd" * 32]
    assert doc.resellers["free"].client_cert_sha256 is None
    compiled = compile_policy(doc, 1)
    assert compiled.client_certs == {"bound": frozenset({FP, "cd" * 32})}


@pytest.mark.parametrize(("value", "reason"), [
    (["ab" * 31], "is not a SHA-256 certificate fingerprint"),
    (["zz" * 32], "is not a SHA-256 certificate fingerprint"),
    ([":".join(["ab"] * 31) + ":"], "is not a SHA-256 certificate fingerprint"),
    ([], "an empty list would refuse every key"),
    ("ab" * 32, "valid list"),
])
def test_a_bad_client_cert_fingerprint_is_named(value: Any, reason: str) -> None:
    """A value that is not a SHA-256 fingerprint, or an empty list, is a policy error naming
    the reseller's field."""
    with pytest.raises(ConfigError) as err:
        validate_policy({"resellers": {"acme": {"client_cert_sha256": value}}}, SRC)
    assert err.value.field.startswith("resellers.acme.client_cert_sha256")
    assert reason in err.value.reason


def test_compile_stored_validates_compiles_and_checks_the_databases() -> None:
    """A stored version compiles to its version and rules; with the config's geo settings, a
    rule on a database it lacks refuses it, naming the source; text that is not JSON is a
    ValueError."""
    doc = canonical(validate_policy({"version": 1, "default_action": "allow",
                                     "rules": [_deny("no-asn", asn=["64500"])]}, SRC))
    compiled = compile_stored(doc, 7)
    assert (compiled.version, [r.id for r in compiled.rules]) == (7, ["no-asn"])
    with pytest.raises(ConfigError, match="no-asn") as err:
        compile_stored(doc, 7, "store policy v7", GeoSettings(country_db="c.mmdb"))
    assert "store policy v7" in str(err.value)
    with pytest.raises(ValueError):
        compile_stored("{", 7)


def test_a_screening_window_is_whole_hours_or_days_up_to_a_week() -> None:
    """One parser reads every window text (the policy's `screening.window`, a report's
    `since`): whole hours or days, 1h to 7d; anything else is a ValueError saying which."""
    assert [parse_window(t) for t in ("1h", "24h", "2d", "7d", "168h")] == [1, 24, 48, 168, 168]
    for bad, why in (("0h", "1h to 168h"), ("8d", "1h to 168h"), ("90m", "whole hours"),
                     ("1.5h", "whole hours"), ("", "whole hours"), (24, "whole hours")):
        with pytest.raises(ValueError, match=why):
            parse_window(bad)
