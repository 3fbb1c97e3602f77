"""The store: keys, the policy document, change events and the admission scripts."""

from __future__ import annotations

from gateway.store.base import Store


def open_store(url: str, key_prefix: str = "gw:", timeout_s: float = 1.0) -> Store:
    """The backend for `store.url`: `memory://` (embedded) or a Redis URL."""
    if url.startswith("memory://"):
        from gateway.store.memory import MemoryStore

        return MemoryStore()
    from gateway.store.redis import RedisStore

    return RedisStore(url, key_prefix, timeout_s)


__all__ = ["Store", "open_store"]
