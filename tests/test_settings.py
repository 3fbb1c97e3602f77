"""Tests for gateway.settings: the config loader, its errors, overrides, secrets, check-config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.settings import ConfigError, LoadedConfig, load_settings

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


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    """An empty config file is all defaults."""
    s = _load(_write(tmp_path / "empty.yaml", "")).settings
    assert s.listen == "0.0.0.0:8080"
    assert s.store.url == "memory://"
    assert s.client_ip.header == "X-Forwarded-For"


# --- bad config fixtures -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "field", "reason"),
    [
        ("unknown_field.yaml", "upstream.api_key", "unknown field"),
        ("wrong_type.yaml", "upstream.connect_timeout_s", "valid number"),
        ("bad_url.yaml", "upstream.url", "must be an http(s) URL with a host"),
        ("bad_listen.yaml", "listen", "expected host:port"),
        ("bad_cidr.yaml", "client_ip.trusted_proxies", "not an IP network: '10.0.0.0/33'"),
        ("bad_store_scheme.yaml", "store.url", "scheme must be one of"),
        ("bad_on_error.yaml", "store.on_error", "'closed' or 'open'"),
        ("not_yaml.yaml", "", "not valid YAML"),
        ("not_mapping.yaml", "", "top level must be a mapping"),
    ],
)
def test_bad_config_fixture(name: str, field: str, reason: str) -> None:
    """Each bad config raises ConfigError whose message names the file, the field and the reason."""
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


def test_every_bad_config_fixture_is_tested() -> None:
    """Each fixture under tests/fixtures/bad_config has its case in test_bad_config_fixture."""
    names = {p.name for p in BAD.glob("*.yaml")}
    assert names == {
        "unknown_field.yaml", "wrong_type.yaml", "bad_url.yaml", "bad_listen.yaml",
        "bad_cidr.yaml", "bad_store_scheme.yaml", "bad_on_error.yaml", "not_yaml.yaml",
        "not_mapping.yaml",
    }


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


def test_secret_env_var_names_come_from_the_file(tmp_path: Path) -> None:
    """The config names which environment variables hold the secrets."""
    cfg = _write(tmp_path / "g.yaml",
                 "admin_token_env: MY_ADMIN\nupstream: {api_key_env: MY_KEY}\n")
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


def test_check_config_missing_secret_exits_2(tmp_path: Path) -> None:
    """`gateway check-config` exits 2 naming the missing secret variable."""
    proc = _check_config(CONFIG, tmp_path, {"UPSTREAM_API_KEY": "b"})
    assert proc.returncode == 2
    assert "admin_token_env" in proc.stderr
    assert "GATEWAY_ADMIN_TOKEN" in proc.stderr
