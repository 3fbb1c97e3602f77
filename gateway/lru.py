"""BoundedLRU: the one bounded cache of the hot path, evicting the least recently used entry.

A cache cleared whole when full loses every hot entry at once when a scan of distinct keys
(an attacker rotating addresses or secrets) fills it; an LRU evicts one entry per new key, so
the keys in use stay."""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedLRU(Generic[K, V]):
    """At most `maxsize` entries (0: none kept); `put` past that evicts the least recently
    used one. A hit costs two C calls (`move_to_end`, then the item), a miss one raised and
    caught KeyError: misses are followed by the work the cache saves, hits are the hot path.
    Values must not be None (`get` answers None for a miss). One thread only, like the event
    loop that uses it."""

    __slots__ = ("_d", "maxsize")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 0:
            raise ValueError("maxsize must be >= 0")
        self.maxsize = maxsize
        self._d: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        """The value cached for `key`, now the most recently used, or None."""
        d = self._d
        try:
            d.move_to_end(key)
        except KeyError:
            return None
        return d[key]

    def put(self, key: K, value: V) -> None:
        """Cache `value` for `key` as the most recently used entry, evicting the least
        recently used one when that makes more than `maxsize`."""
        d = self._d
        d[key] = value
        d.move_to_end(key)
        if len(d) > self.maxsize:
            d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()

    def __len__(self) -> int:
        return len(self._d)
