"""Tests for gateway.settings: the config loader, its errors, overrides, secrets, check-config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli import main as cli_main
from gateway.settings import ConfigError, LoadedConfig, load_settings, redact_url

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "gateway.yaml"
BAD = Path(__file__).resolve().parent / "fixtures" / "bad_config"
ENV = {"GATEWAY_ADMIN_TOKEN": "a", "UPSTREAM_API_KEY": "b"}


def _load(path: Path, overrides: list[str] | None = None,
          environ: dict[str, str] | None = None) -> LoadedConfig:
    return load_settings(str(path), overrides, environ=dict(ENV) if environ is None else environ)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- the repository config -----------------------------------------------------------------------


def test_repo_config_loads() -> None:
    """config/gateway.yaml loads with its two secrets in the environment."""
    cfg = _load(CONFIG)
    s = cfg.settings
    assert s.listen == "0.0.0.0:8080"
    assert s.admin_listen == "127.0.0.1:9090"
    assert s.upstream.url == "https://api.anthropic.com"
    assert s.upstream.auth_header == "x-api-key"
    assert s.store.url == "memory://"
    assert s.store.on_error == "closed"
    assert s.client_ip.recursive is True
    assert s.limits_headers == "auto"
    assert cfg.secrets.upstream_api_key == "b"
    assert cfg.secrets.admin_token == "a"


def test_repo_config_relative_paths_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Geo and policy paths resolve against config/, whatever the working directory."""
    monkeypatch.chdir(tmp_path)
    s = _load(CONFIG).settings
    demo = REPO / "geo" / "demo"
    assert s.geo.country_db == str(demo / "Demo-Country.mmdb")
    assert s.geo.asn_db == str(demo / "Demo-ASN.mmdb")
    assert s.geo.anonymous_ip_db == str(demo / "Demo-Anonymous-IP.mmdb")
    assert s.policy_file == str(REPO / "config" / "policy.yaml")
    for p in (s.geo.country_db, s.geo.asn_db, s.geo.anonymous_ip_db, s.policy_file):
        assert p is not None and Path(p).is_file()


def test_relative_paths_in_a_nested_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config's relative paths resolve against its own folder; absolute and null stay as is."""
    monkeypatch.chdir(REPO)
    absolute = tmp_path / "abs" / "ASN.mmdb"
    cfg = _write(tmp_path / "etc" / "gw" / "gateway.yaml", (
        "geo:\n"
        "  country_db: db/Country.mmdb\n"
        f"  asn_db: {absolute}\n"
        "  anonymous_ip_db: null\n"
        "policy_file: ../policy/p.yaml\n"
    ))
    s = _load(cfg).settings
    assert s.geo.country_db == str(tmp_path / "etc" / "gw" / "db" / "Country.mmdb")
    assert s.geo.asn_db == str(absolute)
    assert s.geo.anonymous_ip_db is None
    assert s.policy_file == str(tmp_path / "etc" / "policy" / "p.yaml")


def test_minimal_config_names_only_the_country_database(tmp_path: Path) -> None:
    """A config naming only geo.country_db is all defaults: no ASN or anonymizer database, demo
    databases refused, stale after 35 days."""
    s = _load(_write(tmp_path / "min.yaml", "geo: {country_db: Country.mmdb}\n")).settings
    assert s.listen == "0.0.0.0:8080"
    assert s.store.url == "memory://"
    assert s.client_ip.header == "X-Forwarded-For"
    assert s.geo.country_db == str(tmp_path / "Country.mmdb")
    assert (s.geo.asn_db, s.geo.anonymous_ip_db) == (None, None)
    assert s.geo.allow_demo_databases is False
    assert s.geo.max_age_days == 35


def test_tls_is_off_by_default_and_its_paths_resolve_against_the_file(tmp_path: Path) -> None:
    """Without a tls section the proxy listener speaks plain HTTP; its files resolve against
    the config's folder, and the watch interval defaults to 10 s."""
    assert _load(_write(tmp_path / "a.yaml", "geo: {country_db: C.mmdb}\n")).settings.tls is None
    s = _load(_write(tmp_path / "b.yaml", "geo: {country_db: C.mmdb}\n"
                     "tls: {cert_file: certs/tls.crt, key_file: /abs/tls.key, "
                     "client_ca_file: ca.crt}\n")).settings
    assert s.tls is not None
    assert s.tls.cert_file == str(tmp_path / "certs" / "tls.crt")
    assert s.tls.key_file == "/abs/tls.key"
    assert s.tls.client_ca_file == str(tmp_path / "ca.crt")
    assert (s.tls.require_client_cert, s.tls.reload_interval_s) == (False, 10.0)


@pytest.mark.parametrize(("tls", "field", "reason"), [
    ("{key_file: k.pem}", "tls.cert_file", "required field is missing"),
    ("{cert_file: c.pem}", "tls.key_file", "required field is missing"),
    ("{cert_file: c.pem, key_file: k.pem, require_client_cert: true}",
     "tls.require_client_cert", "needs a client_ca_file"),
    ("{cert_file: c.pem, key_file: k.pem, reload_interval_s: 0}", "tls.reload_interval_s",
     "greater than 0"),
    ("{cert_file: c.pem, key_file: k.pem, ciphers: x}", "tls.ciphers", "unknown field"),
])
def test_a_bad_tls_section_names_its_field(tmp_path: Path, tls: str, field: str,
                                           reason: str) -> None:
    """A tls section without its files, requiring client certificates without a CA to check
    them, or with a bad or unknown field is refused naming the field."""
    path = _write(tmp_path / "gw.yaml", f"geo: {{country_db: C.mmdb}}\ntls: {tls}\n")
    with pytest.raises(ConfigError) as err:
        _load(path)
    assert err.value.field == field and reason in err.value.reason


def test_empty_file_names_the_missing_country_database(tmp_path: Path) -> None:
    """An empty config is an error naming geo.country_db, never a bundled database."""
    with pytest.raises(ConfigError) as info:
        _load(_write(tmp_path / "empty.yaml", ""))
    assert [(p.field, p.reason) for p in info.value.problems] == [
        ("geo.country_db", "required field is missing (the path of a GeoIP2 or GeoLite2 "
                           "Country or City database)")]


# --- bad config fixtures -------------------------------------------------------------------------


BAD_CONFIGS = [
    ("unknown_field.yaml", "upstream.api_key", "unknown field"),
    ("wrong_type.yaml", "upstream.connect_timeout_s", "valid number"),
    ("bad_url.yaml", "upstream.url", "must be an http(s) URL with a host"),
    ("bad_listen.yaml", "listen", "expected host:port"),
    ("bad_cidr.yaml", "client_ip.trusted_proxies", "not an IP network: '10.0.0.0/33'"),
    ("bad_store_scheme.yaml", "store.url", "scheme must be one of"),
    ("bad_on_error.yaml", "store.on_error", "'closed' or 'open'"),
    ("not_yaml.yaml", "", "not valid YAML: while parsing a flow sequence expected ',' or ']', "
                          "but got ':' (line 5, column 9)"),
    ("not_mapping.yaml", "", "top level must be a mapping"),
    ("bad_retention_days.yaml", "usage.retention_days", "greater than 0"),
    ("hash_chain_console.yaml", "log.hash_chain", "needs log.format: json"),
    ("tls_with_proxy_protocol.yaml", "client_ip.proxy_protocol", "cannot be used with tls"),
    ("no_country_db.yaml", "geo.country_db", "required field is missing"),
    ("duplicate_key.yaml", "upstream.url", "duplicate key at line 5 (first at line 3)"),
    ("listen_equals_admin.yaml", "admin_listen",
     "127.0.0.1:8080 overlaps listen 127.0.0.1:8080: the admin listener needs a port of its "
     "own"),
    ("listen_overlaps_admin.yaml", "admin_listen", "overlaps listen 0.0.0.0:9090"),
]
#: Fixtures whose file loads, and whose problem is found by check-config and run (databases,
#: the policy file), with the error lines they print; or a warning only.
PREFLIGHT = {
    "demo_database.yaml": [
        "Demo-Country.mmdb is the bundled demo database 'Demo-Country', made-up data: set "
        "geo.allow_demo_databases: true to use it (demo only)"],
    "missing_database.yaml": [
        "missing_database.yaml: geo.country_db: cannot open ",
        "missing_database.yaml: geo.asn_db: cannot open "],
    "rule_needs_database.yaml": [
        "needs_databases.yaml: rules[anonymizers].match.anonymizer: needs "
        "geo.anonymous_ip_db, which the gateway config does not set",
        "needs_databases.yaml: rules[bad-network].match.asn: needs geo.asn_db, which the "
        "gateway config does not set"],
    "policy_duplicate_key.yaml": [
        "policies/duplicate_key.yaml: rules[0].action: duplicate key at line 8 (first at "
        "line 5)"],
    "trust_everyone.yaml": [],
}


@pytest.mark.parametrize(("name", "field", "reason"), BAD_CONFIGS)
def test_bad_config_fixture(name: str, field: str, reason: str) -> None:
    """Each bad config raises ConfigError whose message names the file, the field and the
    reason, on one line (each fixture holds one mistake)."""
    path = BAD / name
    with pytest.raises(ConfigError) as info:
        _load(path)
    err = info.value
    msg = str(err)
    assert err.file == str(path)
    assert err.field == field
    assert reason in err.reason
    assert msg.startswith(f"{path}: {field + ': ' if field else ''}")
    assert name in msg and field in msg and reason in msg
    assert len(err.problems) == 1 and "\n" not in msg


def test_every_bad_config_fixture_is_tested() -> None:
    """Each fixture under tests/fixtures/bad_config has its case here or in the check-config
    cases."""
    names = {p.name for p in BAD.glob("*.yaml")}
    assert names == {name for name, _, _ in BAD_CONFIGS} | set(PREFLIGHT) | {"three_errors.yaml"}


def test_every_error_of_a_file_is_reported_at_once() -> None:
    """A file with three mistakes reports all three, in file order, one line each."""
    path = BAD / "three_errors.yaml"
    with pytest.raises(ConfigError) as info:
        _load(path)
    assert [(p.field, p.reason) for p in info.value.problems] == [
        ("listen", "port out of range in '0.0.0.0:99999'"),
        ("upstream.url", "must be an http(s) URL with a host, got 'ftp://api.anthropic.com'"),
        ("store.on_error", "Input should be 'closed' or 'open'"),
    ]
    assert str(info.value).splitlines() == [p.line() for p in info.value.problems]
    assert all(line.startswith(f"{path}: ") for line in str(info.value).splitlines())


def test_every_duplicate_key_is_named_with_its_path_and_line(tmp_path: Path) -> None:
    """Duplicate keys are refused wherever they are (nested, in lists), all at once; a YAML
    merge key may still be overridden."""
    cfg = _write(tmp_path / "dups.yaml", (
        "geo: {country_db: C.mmdb}\n"           # 1
        "listen: 127.0.0.1:1\n"                 # 2
        "client_ip:\n"                          # 3
        "  trusted_proxies: [10.0.0.0/8]\n"     # 4
        "  trusted_proxies: [0.0.0.0/0]\n"      # 5
        "base: &base {connect_timeout_s: 1}\n"  # 6 (unknown field, never reached)
        "listen: 127.0.0.1:2\n"                 # 7
    ))
    with pytest.raises(ConfigError) as info:
        _load(cfg)
    assert [(p.field, p.reason) for p in info.value.problems] == [
        ("client_ip.trusted_proxies", "duplicate key at line 5 (first at line 4)"),
        ("listen", "duplicate key at line 7 (first at line 2)"),
    ]
    merged = _write(tmp_path / "merge.yaml", (
        "geo: {country_db: C.mmdb}\n"
        "upstream:\n  <<: {connect_timeout_s: 1, read_timeout_s: 2}\n  connect_timeout_s: 3\n"))
    up = _load(merged).settings.upstream
    assert (up.connect_timeout_s, up.read_timeout_s) == (3, 2)


@pytest.mark.parametrize(
    ("listen", "admin", "clash"),
    [
        ("0.0.0.0:8080", "127.0.0.1:9090", False),
        ("127.0.0.1:8080", "127.0.0.2:8080", False),
        ("127.0.0.1:0", "127.0.0.1:0", False),
        ("[::]:8080", "127.0.0.1:8080", True),
        ("127.0.0.1:8080", "0.0.0.0:8080", True),
        ("[::1]:9090", "[::1]:9090", True),
    ],
)
def test_listen_and_admin_listen_must_not_overlap(tmp_path: Path, listen: str, admin: str,
                                                  clash: bool) -> None:
    """The same port on the same or a wildcard address is refused; port 0 (any free port) and
    distinct addresses are not."""
    cfg = _write(tmp_path / "g.yaml", "geo: {country_db: C.mmdb}\n")
    overrides = [f"listen='{listen}'", f"admin_listen='{admin}'"]
    if not clash:
        assert _load(cfg, overrides).settings.admin_listen == admin
        return
    with pytest.raises(ConfigError) as info:
        _load(cfg, overrides)
    assert info.value.field == "admin_listen"
    assert f"overlaps listen {listen}" in info.value.reason


def test_trust_everyone_is_a_warning(tmp_path: Path) -> None:
    """trusted_proxies 0.0.0.0/0 or ::/0 loads, with one warning line per network."""
    cfg = _load(BAD / "trust_everyone.yaml")
    assert cfg.warnings == tuple(
        f"{BAD / 'trust_everyone.yaml'}: client_ip.trusted_proxies: {net} trusts every peer: "
        "any client can choose the address it is located and limited by (X-Forwarded-For)"
        for net in ("0.0.0.0/0", "::/0"))
    assert _load(CONFIG).warnings == ()


# --- PROXY protocol and egress (client_ip.proxy_protocol*, upstream.ca_file, trust_env) -----


def test_proxy_protocol_and_egress_defaults(tmp_path: Path) -> None:
    """By default the PROXY protocol is off, the system CAs verify the upstream and the proxy
    variables of the environment are ignored."""
    s = _load(_write(tmp_path / "min.yaml", "geo: {country_db: Country.mmdb}\n")).settings
    assert (s.client_ip.proxy_protocol, s.client_ip.proxy_protocol_from) == ("off", [])
    assert s.client_ip.proxy_protocol_timeout_s == 5
    assert (s.upstream.ca_file, s.upstream.trust_env) == (None, False)


def test_bare_yaml_off_turns_the_proxy_protocol_off(tmp_path: Path) -> None:
    """`proxy_protocol: off` unquoted (YAML 1.1 reads it as false) means off."""
    path = _write(tmp_path / "pp.yaml", "geo: {country_db: C.mmdb}\nclient_ip: "
                  "{proxy_protocol: off}\n")
    assert _load(path).settings.client_ip.proxy_protocol == "off"


@pytest.mark.parametrize(("client_ip", "field", "reason"), [
    ("{proxy_protocol: v2}", "client_ip",
     "proxy_protocol: v2 needs proxy_protocol_from (the load balancers' networks)"),
    ("{proxy_protocol: v3, proxy_protocol_from: [10.0.0.0/8]}", "client_ip.proxy_protocol",
     "Input should be 'off', 'v1', 'v2' or 'any'"),
    ("{proxy_protocol: any, proxy_protocol_from: [10.0.0.300/8]}",
     "client_ip.proxy_protocol_from", "not an IP network: '10.0.0.300/8'"),
    ("{proxy_protocol: any, proxy_protocol_from: [10.0.0.0/8], proxy_protocol_timeout_s: 0}",
     "client_ip.proxy_protocol_timeout_s", "Input should be greater than 0"),
])
def test_bad_proxy_protocol_settings(tmp_path: Path, client_ip: str, field: str,
                                     reason: str) -> None:
    """A PROXY protocol without the peers it is accepted from, an unknown mode, a bad network
    or a zero timeout is a config error naming the field."""
    path = _write(tmp_path / "pp.yaml", f"geo: {{country_db: C.mmdb}}\nclient_ip: {client_ip}\n")
    with pytest.raises(ConfigError) as info:
        _load(path)
    assert (info.value.field, info.value.reason) == (field, reason)


def test_proxy_protocol_from_everyone_is_a_warning(tmp_path: Path) -> None:
    """proxy_protocol_from 0.0.0.0/0 loads, with a warning that any client picks its address."""
    path = _write(tmp_path / "pp.yaml", "geo: {country_db: C.mmdb}\nclient_ip: "
                  "{proxy_protocol: v2, proxy_protocol_from: [0.0.0.0/0]}\n")
    assert _load(path).warnings == (
        f"{path}: client_ip.proxy_protocol_from: 0.0.0.0/0 trusts every peer: any client can "
        "choose the address it is located and limited by (PROXY protocol)",)


def test_upstream_ca_file_resolves_and_is_checked(tmp_path: Path) -> None:
    """upstream.ca_file resolves against the config's directory; a missing file or one with
    no PEM certificate is a config error naming upstream.ca_file."""
    path = _write(tmp_path / "c.yaml", "geo: {country_db: C.mmdb}\n"
                  "upstream: {ca_file: missing-ca.pem, trust_env: true}\n")
    with pytest.raises(ConfigError) as info:
        _load(path)
    assert info.value.field == "upstream.ca_file"
    assert info.value.reason == (f"cannot read {tmp_path / 'missing-ca.pem'}: "
                                 "no such file or directory")
    _write(tmp_path / "junk.pem", "not a certificate\n")
    with pytest.raises(ConfigError) as info:
        _load(path, ["upstream.ca_file=junk.pem"])
    assert info.value.reason == f"{tmp_path / 'junk.pem'} holds no PEM certificate"


def test_missing_file() -> None:
    """A config file that does not exist is named with the reason."""
    path = BAD / "does_not_exist.yaml"
    with pytest.raises(ConfigError, match=r"does_not_exist\.yaml: cannot read"):
        _load(path)


def test_bad_config_error_does_not_echo_unknown_secret_value() -> None:
    """An unknown field's error names the field, not its value."""
    with pytest.raises(ConfigError) as info:
        _load(BAD / "unknown_field.yaml")
    assert "sk-do-not-put-secrets-here" not in str(info.value)


def test_bad_store_url_error_hides_credentials() -> None:
    """A refused store URL with a password does not show the password in the error."""
    with pytest.raises(ConfigError) as info:
        _load(CONFIG, ["store.url=mysql://gw:hunter2@db:3306/gw"])
    assert info.value.field == "store.url"
    assert "hunter2" not in str(info.value)


# --- secrets from the environment ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "field", "var"),
    [
        ({"GATEWAY_ADMIN_TOKEN": "a"}, "upstream.api_key_env", "UPSTREAM_API_KEY"),
        ({"GATEWAY_ADMIN_TOKEN": "a", "UPSTREAM_API_KEY": ""}, "upstream.api_key_env",
         "UPSTREAM_API_KEY"),
        ({"UPSTREAM_API_KEY": "b"}, "admin_token_env", "GATEWAY_ADMIN_TOKEN"),
        ({}, "upstream.api_key_env", "UPSTREAM_API_KEY"),
    ],
)
def test_missing_secret_env_var_is_named(environ: dict[str, str], field: str, var: str) -> None:
    """A missing or empty secret variable raises ConfigError naming the field and the variable."""
    with pytest.raises(ConfigError) as info:
        _load(CONFIG, environ=environ)
    assert info.value.field == field
    assert f"environment variable {var} is not set" in str(info.value)
    assert "gateway.yaml" in str(info.value)


def test_both_missing_secrets_are_named_at_once() -> None:
    """With neither secret set, both variables are named, one line each."""
    with pytest.raises(ConfigError) as info:
        _load(CONFIG, environ={})
    assert [(p.field, p.reason) for p in info.value.problems] == [
        ("upstream.api_key_env", "environment variable UPSTREAM_API_KEY is not set"),
        ("admin_token_env", "environment variable GATEWAY_ADMIN_TOKEN is not set"),
    ]


def test_secret_env_var_names_come_from_the_file(tmp_path: Path) -> None:
    """The config names which environment variables hold the secrets."""
    cfg = _write(tmp_path / "g.yaml",
                 "admin_token_env: MY_ADMIN\nupstream: {api_key_env: MY_KEY}\n"
                 "geo: {country_db: C.mmdb}\n")
    loaded = _load(cfg, environ={"MY_ADMIN": "adm", "MY_KEY": "key"})
    assert (loaded.secrets.admin_token, loaded.secrets.upstream_api_key) == ("adm", "key")
    with pytest.raises(ConfigError, match="environment variable MY_KEY is not set"):
        _load(cfg)


def test_secrets_repr_never_shows_the_secret() -> None:
    """Secrets and the loaded config render without the secret values."""
    env = {"GATEWAY_ADMIN_TOKEN": "admin-s3cr3t-token", "UPSTREAM_API_KEY": "sk-ant-s3cr3t"}
    cfg = _load(CONFIG, environ=env)
    for text in (repr(cfg.secrets), str(cfg.secrets), f"{cfg.secrets}", repr(cfg), str(cfg),
                 repr([cfg.secrets]), repr(cfg.settings)):
        assert "s3cr3t" not in text
    assert cfg.secrets.upstream_api_key == "sk-ant-s3cr3t"


# --- overrides -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["upstream.url=http://x:1"], lambda s: s.upstream.url == "http://x:1"),
        (["upstream.url=http://x:1/"], lambda s: s.upstream.url == "http://x:1"),
        (["store.on_error=open", "store.fallback_instances=3"],
         lambda s: (s.store.on_error, s.store.fallback_instances) == ("open", 3)),
        (["client_ip.recursive=false"], lambda s: s.client_ip.recursive is False),
        (["client_ip.trusted_proxies=[10.1.0.0/16, '::1/128']"],
         lambda s: s.client_ip.trusted_proxies == ["10.1.0.0/16", "::1/128"]),
        (["listen=127.0.0.1:18080", "listen='[::1]:8081'"], lambda s: s.listen == "[::1]:8081"),
        (["log.format=console"], lambda s: s.log.format == "console"),
        (["upstream.url=http://a:1?x=y"], lambda s: s.upstream.url == "http://a:1?x=y"),
    ],
)
def test_overrides_apply(overrides: list[str], check: object) -> None:
    """`--set dotted.field=yaml-value` overrides replace file values, later ones winning."""
    s = _load(CONFIG, overrides).settings
    assert callable(check) and check(s)


@pytest.mark.parametrize(
    ("override", "field", "reason"),
    [
        ("upstream.url=ftp://x", "upstream.url", "must be an http(s) URL"),
        ("listen=0.0.0.0:99999", "listen", "port out of range"),
        ("upstream.read_timeout_s=0", "upstream.read_timeout_s", "greater than 0"),
        ("upstream.nope=1", "upstream.nope", "unknown field"),
        ("listen.port=1", "listen.port", "listen is not a section"),
        ("upstream.url", "upstream.url", "override must look like field.path=value"),
        ("=1", "=1", "override must look like field.path=value"),
        ("store.url=[unclosed", "store.url", "got a URL without a scheme"),
    ],
)
def test_bad_overrides_are_named(override: str, field: str, reason: str) -> None:
    """A bad override raises ConfigError naming the overridden field and the reason."""
    with pytest.raises(ConfigError) as info:
        _load(CONFIG, [override])
    assert info.value.field == field
    assert reason in info.value.reason
    assert "gateway.yaml" in str(info.value)


# --- gateway check-config ------------------------------------------------------------------------


def _check_config(
    path: Path, cwd: Path, env_extra: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )


def test_check_config_ok_on_repo_config(tmp_path: Path) -> None:
    """`gateway check-config` exits 0 and says ok for the repository config."""
    proc = _check_config(CONFIG, tmp_path, ENV)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
    assert str(CONFIG) in proc.stdout


def test_check_config_bad_fixture_exits_2(tmp_path: Path) -> None:
    """`gateway check-config` exits 2 and names file, field and reason on stderr."""
    proc = _check_config(BAD / "bad_cidr.yaml", tmp_path, ENV)
    assert proc.returncode == 2
    assert "bad_cidr.yaml" in proc.stderr
    assert "client_ip.trusted_proxies" in proc.stderr
    assert "not an IP network" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("name", sorted(PREFLIGHT))
def test_check_config_fixture(name: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway check-config` prints every problem of a fixture's databases and policy file,
    one `error:` line each, and exits 2; a warning alone prints one `warning:` line and ok."""
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    code = cli_main(["check-config", "--config", str(BAD / name)])
    out, err = capsys.readouterr()
    expected = PREFLIGHT[name]
    lines = err.splitlines()
    if not expected:
        assert code == 0 and "ok" in out
        assert len(lines) == 2 and all(x.startswith("warning: ") for x in lines)
        assert "0.0.0.0/0 trusts every peer" in lines[0]
        return
    assert code == 2 and out == ""
    assert len(lines) == len(expected)
    for line, part in zip(lines, expected, strict=True):
        assert line.startswith("error: ") and part in line


def test_check_config_missing_secret_exits_2(tmp_path: Path) -> None:
    """`gateway check-config` exits 2 naming the missing secret variable."""
    proc = _check_config(CONFIG, tmp_path, {"UPSTREAM_API_KEY": "b"})
    assert proc.returncode == 2
    assert "admin_token_env" in proc.stderr
    assert "GATEWAY_ADMIN_TOKEN" in proc.stderr


# --- redact_url: no credential form in a URL survives redaction ---------------------------------


SECRET = "s3cr3t-Pw"


@pytest.mark.parametrize("url", [
    f"redis://:{SECRET}@10.0.0.5:6379/0",
    f"redis://app:{SECRET}@10.0.0.5:6379/0",
    f"rediss://app:{SECRET}@redis.example:6380/1?ssl_cert_reqs=required",
    f"redis://10.0.0.5:6379/0?password={SECRET}",
    f"redis://10.0.0.5:6379/0?db=0&PASSWORD={SECRET}&health_check_interval=5",
    f"redis+sentinel://:{SECRET}@s1:26379,s2:26379,s3:26379/gwmaster/0",
    f"redis+sentinel://u:{SECRET}@s1:26379,u:{SECRET}@s2:26379/gwmaster",
    f"redis+sentinel://s1:26379,s2:26379/gwmaster?sentinel_password={SECRET}",
    f"redis+cluster://app:{SECRET}@c1:7000,c2:7001",
    f"unix:///run/redis.sock?password={SECRET}&db=2",
    f"https://user:{SECRET}@api.example",
    f"https://{SECRET}@api.example/v1",
    f"redis://app:{SECRET[:4]},{SECRET[4:]}@h1:6379/0",
    f"redis://app:{SECRET[:4]}@{SECRET[4:]}@h1:6379/0",
    f"redis://h1:6379/0?token={SECRET}#frag",
])
def test_credentials_are_removed(url: str) -> None:
    """User-info passwords, tokens and credential query parameters never survive."""
    out = redact_url(url)
    assert SECRET not in out and SECRET[:4] not in out and SECRET[4:] not in out
    assert "***" in out


@pytest.mark.parametrize(("url", "expected"), [
    ("memory://", "memory://"),
    ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ("https://api.anthropic.com", "https://api.anthropic.com"),
    ("redis://app:pw@10.0.0.5:6379/0?db=1", "redis://app:***@10.0.0.5:6379/0?db=1"),
    ("redis+sentinel://:pw@s1:26379,s2:26379/gwmaster",
     "redis+sentinel://:***@s1:26379,s2:26379/gwmaster"),
    ("redis://h:1/0?password=pw&db=2", "redis://h:1/0?password=***&db=2"),
])
def test_hosts_and_harmless_parts_stay_readable(url: str, expected: str) -> None:
    """Hosts, ports, paths and harmless parameters are kept so the operator can read them."""
    assert redact_url(url) == expected


@pytest.mark.parametrize("url", [
    f"redis://h:1?password={SECRET}",
    f"redis://app:pa/{SECRET}@h1:6379/0",
    f"redis://app:{SECRET}/x@h1:6379/0",
    f"redis://app:pa?{SECRET}@h1:6379/0",
    f"redis://app:pa#{SECRET}@h1:6379/0",
    f"redis://h1:6379/0?password=a@{SECRET}",
    f"redis://h1:6379/0?pass@{SECRET}",
])
def test_awkward_spellings_are_redacted(url: str) -> None:
    """Delimiters inside a password, or a query without a path, still leak nothing."""
    assert SECRET not in redact_url(url)


_PASSWORD = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                    min_size=6, max_size=40).map(lambda s: "Q~" + s)


@given(_PASSWORD, st.sampled_from(["redis", "rediss", "redis+sentinel", "redis+cluster",
                                   "https"]))
def test_any_userinfo_password_is_removed(password: str, scheme: str) -> None:
    """Whatever characters a user-info password holds, it never survives whole."""
    for url in (f"{scheme}://app:{password}@h1:6379/0",
                f"{scheme}://:{password}@h1:26379,h2:26379/gwmaster",
                f"{scheme}://app:{password}@h1:7000,app:{password}@h2:7001"):
        assert password not in redact_url(url)


@given(_PASSWORD.filter(lambda s: "&" not in s and "#" not in s))
def test_any_query_password_is_removed(password: str) -> None:
    """A password given as a query parameter never survives whole."""
    assert password not in redact_url(f"redis://h1:6379/0?db=1&password={password}")
