"""Property tests for the pure parsers: forwarding headers, request targets, path globs,
attestation and policy documents never raise anything but their documented error."""

from __future__ import annotations

import fnmatch
import ipaddress
import itertools
import json
import posixpath
import re
from typing import Any

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from gateway.client_ip import ClientIPResolver, Resolution, parse_addr
from gateway.errors import GatewayError
from gateway.geo import GeoInfo
from gateway.identity import CUSTOMER_ID_RE, Attestation, parse_attestation
from gateway.paths import compile_path_globs, normalize_target
from gateway.policy import RuleFacts, canonical, compile_policy, evaluate_rules, validate_policy
from gateway.settings import ConfigError

SETTINGS = settings(max_examples=200, deadline=None)
TRUSTED = ["127.0.0.0/8", "10.0.0.0/8", "fd00::/8"]
PEER = "127.0.0.1"
XFF = ClientIPResolver(TRUSTED, "X-Forwarded-For", recursive=True)
FWD = ClientIPResolver(TRUSTED, "Forwarded", recursive=True)

# --- forwarding headers --------------------------------------------------------------------------

_untrusted_v4 = st.ip_addresses(v=4, network="198.51.100.0/24")
_untrusted_v6 = st.ip_addresses(v=6, network="2001:db8::/32")
_trusted = st.one_of(st.ip_addresses(v=4, network="10.0.0.0/8"),
                     st.ip_addresses(v=6, network="fd00::/8"))
_port = st.one_of(st.none(), st.integers(1, 65535))
_junk = st.text(alphabet=st.sampled_from(list('"\\,;= \tfor[]:.1_x\u00e9')), max_size=40)


def _fwd_node(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int | None) -> str:
    """A `for=` pair as a proxy writes it: quoted when it holds ':' or brackets."""
    host = f"[{addr}]" if addr.version == 6 else str(addr)
    node = host if port is None else f"{host}:{port}"
    return f"for={node}" if addr.version == 4 and port is None else f'for="{node}"'


@SETTINGS
@given(sent=_junk, client=st.one_of(_untrusted_v4, _untrusted_v6), port=_port,
       proxies=st.lists(st.tuples(_trusted, _port), max_size=4), extra=st.booleans())
def test_forwarded_appended_hops_survive_any_client_prefix(
    sent: str, client: Any, port: int | None, proxies: list[tuple[Any, int | None]],
    extra: bool,
) -> None:
    """Whatever a client sends, the first untrusted hop its trusted proxies appended wins."""
    parts = [_fwd_node(client, port) + (";proto=https;by=_lb" if extra else "")]
    parts += [_fwd_node(a, p) for a, p in proxies]
    got = FWD.resolve(PEER, [sent, ", ".join(parts)])
    assert got == Resolution(parse_addr(str(client)) or "", "header", len(proxies))


@SETTINGS
@given(sent=st.text(max_size=40), client=st.one_of(_untrusted_v4, _untrusted_v6),
       proxies=st.lists(_trusted, max_size=4))
def test_xff_appended_hops_survive_any_client_prefix(
    sent: str, client: Any, proxies: list[Any]
) -> None:
    """In X-Forwarded-For too, a client's prefix cannot change what its proxies appended."""
    header = ", ".join([sent, str(client), *map(str, proxies)])
    got = XFF.resolve(PEER, [header])
    assert got == Resolution(str(client), "header", len(proxies))


@SETTINGS
@given(peer=st.one_of(st.just(PEER), st.text(max_size=10)),
       values=st.lists(st.one_of(_junk, st.text(max_size=60)), max_size=3),
       forwarded=st.booleans())
def test_forwarding_headers_never_raise_and_only_yield_header_addresses(
    peer: str, values: list[str], forwarded: bool
) -> None:
    """resolve never raises; a header result is a canonical address that appears in the header."""
    got = (FWD if forwarded else XFF).resolve(peer, values)
    if got.source == "peer":
        assert got.hop == -1
    else:
        assert str(ipaddress.ip_address(got.client_ip)) == got.client_ip
        assert got.hop >= 0
        assert got.client_ip in _addresses_in(",".join(values))


def _addresses_in(text: str) -> set[str]:
    """Every address spelled in a header, however quoted, escaped or ported."""
    out: set[str] = set()
    for tok in re.split(r'[,;="\s]+', text.replace("\\", "")):
        for cand in (tok, re.sub(r":_[A-Za-z0-9._-]+$", "", tok)):
            addr = parse_addr(cand)
            if addr is not None:
                out.add(addr)
    return out


# --- request targets -----------------------------------------------------------------------------

_target_chars = st.sampled_from([*"ab/.%2eEfF5c~-_?#;=\\ \x00\u00e9:@",
                                 "%2e", "%2F", "%41", "..", "//", "%25"])
_targets = st.one_of(
    st.text(max_size=60),
    st.lists(_target_chars, max_size=30).map(lambda xs: "/" + "".join(xs)),
)
_UNRESERVED = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ref_segment = st.sampled_from(["a", "b", "c1", ".", "..", "", "x.y", "~u"])


@SETTINGS
@given(raw=_targets)
def test_normalize_target_is_total_and_idempotent(raw: str) -> None:
    """Only ValueError escapes; a result is a fixed point free of '//' and dot segments."""
    try:
        path, query = normalize_target(raw)
    except ValueError as err:
        assert len(str(err)) <= 256
        return
    assert path.startswith("/")
    assert "//" not in path and "/./" not in path and "/../" not in path
    assert not path.endswith(("/.", "/..")) and "\\" not in path and "\x00" not in path
    assert normalize_target(path) == (path, "")
    assert normalize_target(path + ("?" + query if query else "")) == (path, query)
    assert query == raw.partition("?")[2]
    for esc in re.findall(r"%(..)", path):
        assert esc == esc.upper() and chr(int(esc, 16)) not in _UNRESERVED


@SETTINGS
@given(segments=st.lists(_ref_segment, min_size=1, max_size=10))
def test_normalize_target_agrees_with_posix_resolution(segments: list[str]) -> None:
    """Without escapes, the result is POSIX path resolution (up to a trailing slash), or refused
    exactly when '..' would climb above the root."""
    raw = "/" + "/".join(segments)
    depth, climbs = 0, False
    for seg in [s for s in segments if s]:
        depth = depth - 1 if seg == ".." else depth + (seg != ".")
        climbs = climbs or depth < 0
    try:
        path, _ = normalize_target(raw)
    except ValueError:
        assert climbs
        return
    assert not climbs
    assert posixpath.normpath("/" + raw.lstrip("/")) == posixpath.normpath(path)


# --- path globs ----------------------------------------------------------------------------------

_glob_segment = st.one_of(
    st.just("**"),
    st.lists(st.sampled_from(["a", "b", "*", "?", "[ab]", "[!a]", "c"]), min_size=1,
             max_size=4).map("".join).filter(lambda s: "**" not in s),
)
_path_segment = st.text(alphabet="abc", max_size=3)


def _reference(glob: list[str], path: list[str]) -> bool:
    """Segment-wise fnmatch, '**' matching zero or more whole segments."""
    if not glob:
        return not path
    if glob[0] == "**":
        return any(_reference(glob[1:], path[i:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], glob[0]) and _reference(glob[1:], path[1:])


@SETTINGS
@given(glob=st.lists(_glob_segment, min_size=1, max_size=5),
       path=st.lists(_path_segment, min_size=1, max_size=6))
def test_path_globs_agree_with_segment_wise_fnmatch(glob: list[str], path: list[str]) -> None:
    """A compiled path glob matches exactly when a segment-by-segment fnmatch does."""
    assume(all(path[:-1]))  # a normalised path has no empty segment but a trailing one
    compiled = compile_path_globs(["/" + "/".join(glob)])
    assert compiled is not None
    assert compiled.match("/" + "/".join(path)) is _reference(glob, path)


@SETTINGS
@given(glob=st.text(max_size=30), path=st.text(max_size=30))
def test_path_glob_compile_only_raises_value_error(glob: str, path: str) -> None:
    """Any text either compiles (and then matches without raising) or raises ValueError."""
    try:
        compiled = compile_path_globs([glob])
    except ValueError:
        return
    assert compiled is not None
    assert compiled.match(path) in (True, False)
    assert compiled.match(glob) in (True, False)


# --- attestation ---------------------------------------------------------------------------------

_maybe_text = st.one_of(st.none(), st.text(max_size=140),
                        st.ip_addresses().map(str), st.from_regex(CUSTOMER_ID_RE, fullmatch=True))


@SETTINGS
@given(cid=_maybe_text, cip=_maybe_text)
def test_attestation_parses_or_is_a_400(cid: str | None, cip: str | None) -> None:
    """parse_attestation returns clean values or raises 400 invalid_customer_attestation."""
    try:
        att = parse_attestation(cid, cip)
    except GatewayError as err:
        assert (err.status, err.code) == (400, "invalid_customer_attestation")
        return
    assert isinstance(att, Attestation)
    assert (att.customer_id is None) is (cid is None)
    if att.customer_id is not None:
        assert CUSTOMER_ID_RE.fullmatch(att.customer_id)
    if att.customer_ip is not None:
        assert str(ipaddress.ip_address(att.customer_ip)) == att.customer_ip


# --- policy documents ----------------------------------------------------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=False),
              st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=20,
)
_match = st.fixed_dictionaries({}, optional={
    "country": st.one_of(st.lists(st.sampled_from(["CN", "us", "unknown", "XX1", "\u00df"])),
                         _json),
    "not_country": st.lists(st.sampled_from(["RU", "gb"])),
    "asn": st.one_of(st.lists(st.one_of(st.integers(-1, 70000), st.just("unknown"))), _json),
    "anonymizer": st.lists(st.sampled_from(["vpn", "tor", "hosting", "vpnn"])),
    "reseller": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=6))),
    "model": st.one_of(st.sampled_from(["claude-*", "[", "gpt-4?"]), _json),
    "path": st.one_of(st.sampled_from(["/v1/messages/**", "/v1/[", "/v1/m*", "v1", "/**"]),
                      st.lists(st.text(max_size=10)), _json),
    "bogus": _json,
})
_rule = st.fixed_dictionaries(
    {"id": st.one_of(st.sampled_from(["r1", "r2", "bad id"]), _json),
     "action": st.sampled_from(["allow", "deny", "block"])},
    optional={"mode": st.sampled_from(["enforce", "shadow", "x"]),
              "reason": st.sampled_from(["blocked_here", "Bad Reason", ""]),
              "match": st.one_of(_match, _json)},
)
_valid_rule = st.builds(
    lambda i, action, shadow, match: {
        "id": f"r{i}", "action": action, "match": match,
        **({"reason": "blocked_here", "mode": "shadow" if shadow else "enforce"}
           if action == "deny" else {})},
    st.integers(0, 3), st.sampled_from(["allow", "deny"]), st.booleans(),
    st.fixed_dictionaries({}, optional={
        "country": st.lists(st.sampled_from(["CN", "us", "unknown"]), max_size=2),
        "anonymizer": st.lists(st.sampled_from(["vpn", "tor"]), max_size=2),
        "model": st.sampled_from(["claude-*", "gpt-4?"]),
        "path": st.lists(st.sampled_from(["/v1/messages/**", "/v1/*", "/v1/models/?"]),
                         min_size=1, max_size=2),
        "reseller": st.sampled_from(["acme", ["acme", "globex"]]),
    }),
)
_limits = st.fixed_dictionaries({}, optional={k: st.one_of(st.integers(-1, 10**6), _json)
                                              for k in ("rpm", "itpm", "otpm", "concurrency")})
_policy = st.fixed_dictionaries({}, optional={
    "version": st.sampled_from([1, 2, "1"]),
    "default_action": st.sampled_from(["allow", "deny", "maybe"]),
    "rules": st.one_of(st.lists(_valid_rule, max_size=4), st.lists(_rule, max_size=4), _json),
    "resellers": st.dictionaries(st.text(max_size=6), st.fixed_dictionaries({}, optional={
        "status": st.sampled_from(["active", "suspended", "paused"]),
        "countries": st.lists(st.sampled_from(["US", "de", "unknown", "usa"])),
        "require_customer": st.booleans(),
        "limits": _limits,
    }), max_size=2),
    "limits": st.fixed_dictionaries({}, optional={"key": _limits, "customer": _limits}),
    "extra": _json,
})
_valid_policy = st.fixed_dictionaries(
    {"rules": st.lists(_valid_rule, max_size=4, unique_by=lambda r: str(r["id"]))},
    optional={"default_action": st.sampled_from(["allow", "deny"])})
_geo = GeoInfo(country="CN", registered_country="CN", asn=4134, asn_org=None,
               anonymizer=("vpn",))


@settings(max_examples=300, deadline=None)
@given(raw=st.one_of(_valid_policy, _policy, _json))
def test_policy_documents_validate_or_raise_config_error(raw: Any) -> None:
    """validate_policy raises only ConfigError; a valid document round-trips and decides."""
    try:
        doc = validate_policy(raw, "p.yaml")
    except ConfigError as err:
        assert str(err).startswith("p.yaml")
        return
    assert validate_policy(json.loads(canonical(doc)), "p.yaml") == doc
    compiled = compile_policy(doc, 1)
    for path in ("/v1/messages", "/v1/models/x"):
        got = evaluate_rules(compiled, RuleFacts(_geo, None, "acme", "claude-x", path))
        assert got.action in ("allow", "deny")


# --- request bodies, max_tokens and SSE usage ----------------------------------------------------

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
                          st.text(max_size=10))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@SETTINGS
@given(data=st.one_of(st.binary(max_size=200),
                      _json_values.map(lambda v: json.dumps(v).encode())))
def test_parse_json_returns_an_object_or_none_or_raises_value_error(data: bytes) -> None:
    """A request body parses to a dict, to None (nothing to judge), or raises ValueError."""
    from gateway.request_body import parse_json
    try:
        doc = parse_json("POST", data)
    except ValueError:
        return
    assert doc is None or isinstance(doc, dict)


@SETTINGS
@given(body=st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens",
                                             "max_output_tokens", "model", "stream"]),
                            _json_values, max_size=4))
def test_output_maximum_is_a_positive_int_or_a_value_error(body: dict[str, Any]) -> None:
    """estimate_request reserves a positive integer (or the default) or raises ValueError,
    and accepts exactly the positive integers (integral floats included)."""
    from gateway.usage import estimate_request
    sent = [v for k, v in body.items() if k.startswith("max_") and v is not None]
    valid = all(not isinstance(v, bool) and isinstance(v, int | float) and v > 0
                and float(v).is_integer() for v in sent)
    try:
        facts = estimate_request(body, 100, "/v1/messages", 4096)
    except ValueError:
        assert not valid
        return
    assert valid
    assert facts.max_output_tokens == (max(int(v) for v in sent) if sent else 4096)


_sse_events = st.lists(st.sampled_from([
    b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":7,'
    b'"output_tokens":1}}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"x"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":42}}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":9}}\n\n',
    b'data: {"choices":[{"delta":{}}],"usage":null}\n\n',
    b"data: [DONE]\n\n", b"data: {broken\n\n", b": comment\n\n",
    b'data: {"choices":[{"delta":{}}],"usage":null}\r\n\r\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}\r\n\r\n',
]), max_size=8)


@SETTINGS
@given(events=_sse_events, garbage=st.binary(max_size=30), cuts=st.lists(
    st.integers(0, 2000), max_size=5))
def test_sse_usage_does_not_depend_on_chunk_boundaries(events: list[bytes], garbage: bytes,
                                                       cuts: list[int]) -> None:
    """The SSE usage parser and the usage-chunk filter never raise, and give the same result
    however the stream is cut into chunks."""
    from gateway.usage import SSEUsageParser, UsageChunkFilter
    stream = b"".join(events) + garbage
    whole, whole_f = SSEUsageParser(), UsageChunkFilter()
    whole.feed(stream)
    expected = whole_f.feed(stream) + whole_f.flush()
    bounds = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    parts, filtered = SSEUsageParser(), UsageChunkFilter()
    out = b""
    for a, b in itertools.pairwise(bounds):
        parts.feed(stream[a:b])
        out += filtered.feed(stream[a:b])
    out += filtered.flush()
    assert (parts.usage, parts.usage.output_final) == (whole.usage, whole.usage.output_final)
    assert out == expected
    assert b'"usage":null' not in out
