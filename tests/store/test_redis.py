"""Unit tests for gateway.store.redis: Sentinel URL parsing, reply decoding and the bundled
Lua scripts (the store itself runs against real Redis in tests/contract/)."""

from __future__ import annotations

import pytest

from gateway.store.redis import _lua, _sentinel_parts, _two_ints


def test_sentinel_url_names_hosts_service_db_and_password() -> None:
    """Every host with its port (26379 by default), the service, the db and the password."""
    hosts, service, db, password = _sentinel_parts(
        "redis+sentinel://:p%40ss@s1:26380,s2,[::1]:26381,[fd00::2]/gwmaster/3")
    assert hosts == [("s1", 26380), ("s2", 26379), ("::1", 26381), ("fd00::2", 26379)]
    assert (service, db, password) == ("gwmaster", 3, "p@ss")


def test_sentinel_url_without_db_or_password() -> None:
    """No db segment means db 0; no user-info means no password."""
    assert _sentinel_parts("redis+sentinel://s1:26379/gw") == ([("s1", 26379)], "gw", 0, None)


def test_sentinel_url_needs_a_service_name() -> None:
    """A Sentinel URL with no path is refused, saying the service name is needed."""
    with pytest.raises(ValueError, match="service name"):
        _sentinel_parts("redis+sentinel://s1:26379")


def test_two_ints_decodes_a_pair_and_refuses_anything_else() -> None:
    """A two-element reply becomes two ints (nil as 0); any other shape is a TypeError."""
    assert _two_ints([b"3", None]) == (3, 0)
    assert _two_ints([1, 2]) == (1, 2)
    for bad in ([1], [1, 2, 3], b"12", None):
        with pytest.raises(TypeError):
            _two_ints(bad)


def test_the_lua_scripts_ship_with_the_package() -> None:
    """Each script the store loads is readable from the installed package."""
    from importlib import resources

    names = [p.name for p in resources.files("gateway.store").joinpath("lua").iterdir()
             if p.name.endswith(".lua")]
    assert names
    for name in names:
        assert "redis.call" in _lua(name) or "KEYS" in _lua(name), name
