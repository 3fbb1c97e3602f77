"""Unit tests for gateway.cli: option parsing (expiry, limits, times), the admin API address of
the embedded store's commands, and exit codes of in-process `main` calls."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli import (
    EXIT_USAGE,
    CliError,
    _expires,
    _iso,
    _limit_arg,
    _print_usage_csv,
    _print_usage_table,
    _quota_arg,
    admin_operations,
    build_parser,
    main,
)
from gateway.operations import AdminOperations
from gateway.settings import ConfigError, load_settings
from gateway.store.base import DIMENSIONS
from tests.support.gateway import write_config


def test_expires_accepts_durations_and_iso_times() -> None:
    """`30d`-style durations count from now; ISO times are UTC unless they name a zone."""
    assert _expires(None) is None
    got = _expires("2d")
    assert got is not None and abs(got - (time.time() + 2 * 86400)) < 60
    assert _expires("2030-01-01T00:00:00") == 1_893_456_000.0
    assert _expires("2030-01-01T01:00:00+01:00") == 1_893_456_000.0
    assert _expires("2030-01-01T00:00:00Z") == 1_893_456_000.0


def test_a_bad_expiry_is_a_usage_error() -> None:
    """Anything else is a CliError with the usage exit code, naming the accepted forms."""
    with pytest.raises(CliError, match="30d, 12h") as err:
        _expires("next week")
    assert err.value.code == EXIT_USAGE


def test_limit_arg_is_a_non_negative_integer_or_default() -> None:
    """`default` removes the key's own limit (None); negatives and words are refused."""
    assert _limit_arg("0") == 0 and _limit_arg("60") == 60
    assert _limit_arg(" Default ") is None
    for bad in ("-1", "ten", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            _limit_arg(bad)


def test_iso_prints_times_or_a_dash() -> None:
    """Numbers print as ISO 8601 UTC; anything else as `-`."""
    assert _iso(0) == "1970-01-01T00:00:00Z"
    assert _iso(None) == "-" and _iso("soon") == "-"


def _config(tmp_path: Path, admin_listen: str, token: str | None) -> AdminOperations:
    path = write_config(tmp_path, "http://127.0.0.1:1", admin_listen=admin_listen)
    env = {"UPSTREAM_API_KEY": "u"} | ({"GATEWAY_ADMIN_TOKEN": token} if token else {})
    return admin_operations(load_settings(str(path), environ=env))


@pytest.mark.parametrize(("listen", "base"), [
    ("0.0.0.0:9001", "http://127.0.0.1:9001"),
    ("10.0.0.5:9001", "http://10.0.0.5:9001"),
    ("[::1]:9001", "http://[::1]:9001"),
    ("[::]:9001", "http://[::1]:9001"),
])
def test_remote_calls_the_admin_listener(tmp_path: Path, listen: str, base: str) -> None:
    """A wildcard admin address (IPv4 or IPv6) is called on loopback of its family; IPv6
    hosts are bracketed."""
    remote = _config(tmp_path, listen, "tok")
    assert remote.base == base
    assert remote.headers == {"Authorization": "Bearer tok"}


def test_remote_without_the_admin_token_names_the_variable(tmp_path: Path) -> None:
    """Without the admin token, the error names its environment variable, not a value."""
    with pytest.raises(ConfigError, match="GATEWAY_ADMIN_TOKEN"):
        _config(tmp_path, "127.0.0.1:9001", None)


def test_main_version_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    """`--version` prints the version and exits 0; an unknown command exits 2."""
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out
    code: int | None
    try:
        code = main(["no-such-command"])
    except SystemExit as e:
        code = e.code  # type: ignore[assignment]
    assert code == EXIT_USAGE


def test_key_limit_options_are_the_store_dimensions() -> None:
    """`keys issue` and `keys update` take one option per limit dimension of the store."""
    parser = build_parser()
    limits = [x for n, f in enumerate(DIMENSIONS, 1) for x in (f"--{f}", str(n))]
    issue = parser.parse_args(["keys", "issue", "--reseller", "r", *limits])
    assert [getattr(issue, f) for f in DIMENSIONS] == [1, 2, 3, 4]
    defaults = [x for f in DIMENSIONS for x in (f"--{f}", "default")]
    update = parser.parse_args(["keys", "update", "k", *defaults])
    assert [getattr(update, f) for f in DIMENSIONS] == [None] * len(DIMENSIONS)


def test_quota_arg_is_a_name_and_a_count_or_default() -> None:
    """`--quota daily.output_tokens=N` is (name, N); an empty N or `default` removes the
    key's own quota (None)."""
    assert _quota_arg("daily.output_tokens=100") == ("daily.output_tokens", 100)
    assert _quota_arg(" monthly.requests = 0 ") == ("monthly.requests", 0)
    assert _quota_arg("daily.requests=") == ("daily.requests", None)
    assert _quota_arg("daily.requests=Default") == ("daily.requests", None)


@pytest.mark.parametrize(("value", "named"), [
    ("daily.requests", "PERIOD.DIMENSION=N"), ("weekly.requests=1", "unknown period"),
    ("daily.tokens=1", "unknown dimension"), ("daily.requests=-1", "non-negative"),
    ("daily.requests=1.5", "non-negative"), ("daily.requests=none", "non-negative"),
])
def test_a_bad_quota_option_names_what_is_wrong(value: str, named: str) -> None:
    """A missing `=`, an unknown period or dimension, or a value that is no count is an
    argparse error saying which."""
    with pytest.raises(argparse.ArgumentTypeError, match=named):
        _quota_arg(value)


def test_quota_options_repeat_on_issue_and_update() -> None:
    """`--quota` is repeatable on `keys issue` and `keys update`; `usage` takes its filters,
    `--by` and one output format."""
    parser = build_parser()
    issue = parser.parse_args(["keys", "issue", "--reseller", "r", "--quota",
                               "daily.requests=5", "--quota", "monthly.output_tokens=9"])
    assert issue.quota == [("daily.requests", 5), ("monthly.output_tokens", 9)]
    update = parser.parse_args(["keys", "update", "k", "--quota", "daily.requests="])
    assert update.quota == [("daily.requests", None)]
    usage = parser.parse_args(["usage", "--since", "24h", "--reseller", "acme", "--key",
                               "k1", "--customer", "c1", "--by", "model", "--csv"])
    assert (usage.since, usage.reseller, usage.key, usage.customer, usage.by, usage.csv,
            usage.json) == ("24h", "acme", "k1", "c1", "model", True, False)
    for bad in (["usage", "--by", "week"], ["usage", "--json", "--csv"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


REPORT = {"rows": [
    {"day": "2026-12-01", "reseller": None, "key_id": None, "customer_id": None,
     "model": None, "requests": 3, "input_tokens": 30, "output_tokens": 1200},
    {"day": "2026-12-02", "reseller": None, "key_id": None, "customer_id": None,
     "model": None, "requests": 12, "input_tokens": 7, "output_tokens": 5}],
    "totals": {"requests": 15, "input_tokens": 37, "output_tokens": 1205}}


def test_usage_table_shows_the_grouped_columns_and_a_total(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The table leaves out the columns summed over, right-aligns the counts and ends with
    a TOTAL line."""
    _print_usage_table(REPORT, "2026-11-25", "2026-12-02")
    assert capsys.readouterr().out.splitlines() == [
        "usage 2026-11-25 to 2026-12-02 (UTC days)",
        "DAY         REQUESTS  INPUT_TOKENS  OUTPUT_TOKENS",
        "2026-12-01         3            30           1200",
        "2026-12-02        12             7              5",
        "TOTAL             15            37           1205"]
    _print_usage_table({"rows": [], "totals": dict.fromkeys(
        ("requests", "input_tokens", "output_tokens"), 0)}, "2026-12-02", "2026-12-02")
    assert capsys.readouterr().out.splitlines()[1:] == [
        "REQUESTS  INPUT_TOKENS  OUTPUT_TOKENS", "       0             0              0"]


def test_usage_csv_has_all_eight_fields_and_empty_nulls(
        capsys: pytest.CaptureFixture[str]) -> None:
    """CSV: a header of the eight fields, one line per row, null as an empty cell."""
    _print_usage_csv(REPORT["rows"])
    assert capsys.readouterr().out.splitlines() == [
        "day,reseller,key_id,customer_id,model,requests,input_tokens,output_tokens",
        "2026-12-01,,,,,3,30,1200", "2026-12-02,,,,,12,7,5"]


class _Writes:
    """A stderr that records each write call (the processes of `--workers N` share one)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_each_error_line_is_one_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `error:` line (one per problem of a bad config here) reaches stderr in one write,
    newline included: two workers refusing at once must not run their lines together."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: nowhere\nupstream: {url: 'ftp://x'}\n")
    err = _Writes()
    monkeypatch.setattr("sys.stderr", err)
    assert main(["check-config", "--config", str(bad)]) == 2
    assert len(err.calls) >= 2
    assert all(c.startswith("error: ") and c.endswith("\n") and c.count("\n") == 1
               for c in err.calls), err.calls
