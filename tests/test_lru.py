"""Unit tests for gateway.lru: the bounded LRU cache of the hot path."""

from __future__ import annotations

import pytest

from gateway.lru import BoundedLRU


def test_get_answers_what_put_stored_and_none_for_a_miss() -> None:
    """A stored value comes back, falsy ones included; an absent key answers None."""
    cache: BoundedLRU[str, object] = BoundedLRU(4)
    cache.put("a", 1)
    cache.put("f", False)
    assert cache.get("a") == 1
    assert cache.get("f") is False
    assert cache.get("b") is None
    assert len(cache) == 2


def test_never_holds_more_than_maxsize() -> None:
    """Past maxsize each new key evicts exactly one entry: the size stays at maxsize."""
    cache: BoundedLRU[int, int] = BoundedLRU(100)
    for i in range(1000):
        cache.put(i, i)
        assert len(cache) == min(i + 1, 100)
    assert [k for k in range(1000) if cache.get(k) is not None] == list(range(900, 1000))


def test_a_scan_of_distinct_keys_keeps_the_recently_used_key() -> None:
    """A key used between the keys of a scan many times the cache's size stays cached, where a
    cache cleared when full would lose it: only the least recently used entries go."""
    cache: BoundedLRU[str, str] = BoundedLRU(64)
    cache.put("hot", "value")
    for i in range(10 * 64):
        cache.put(f"203.0.113.{i}", "attacker")
        if i % 32 == 0:
            assert cache.get("hot") == "value"
    assert cache.get("hot") == "value"
    assert len(cache) == 64
    assert cache.get("203.0.113.0") is None


def test_get_refreshes_and_put_replaces() -> None:
    """A hit makes its key the most recently used; put on a cached key replaces its value and
    refreshes it too, so the other key is the one evicted."""
    cache: BoundedLRU[str, int] = BoundedLRU(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, None, 3)
    cache.put("a", 10)
    cache.put("d", 4)
    assert (cache.get("a"), cache.get("c"), cache.get("d")) == (10, None, 4)


def test_clear_empties_and_maxsize_zero_keeps_nothing() -> None:
    """clear drops every entry; a cache of size 0 (caching off) never holds one."""
    cache: BoundedLRU[str, int] = BoundedLRU(3)
    cache.put("a", 1)
    cache.clear()
    assert len(cache) == 0 and cache.get("a") is None
    off: BoundedLRU[str, int] = BoundedLRU(0)
    off.put("a", 1)
    assert len(off) == 0 and off.get("a") is None


def test_negative_maxsize_is_refused() -> None:
    """A negative bound is a programming error, refused at construction."""
    with pytest.raises(ValueError, match="maxsize"):
        BoundedLRU(-1)
