"""Tests for gateway.settings.redact_url: no credential form in a URL survives redaction."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.settings import redact_url

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
