"""The store: keys, the policy document, change events and the admission scripts."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from gateway.store.base import Store
from gateway.store.state_file import StateFileError


def memory_state_file(url: str) -> str | None:
    """The state file of an embedded-store URL: `memory:///var/lib/gateway/state.json` names
    one (persisted), plain `memory://` none (ephemeral)."""
    path = unquote(urlsplit(url).path)
    return path or None


def open_store(url: str, key_prefix: str = "gw:", timeout_s: float = 1.0) -> Store:
    """The backend for `store.url`: `memory://` (embedded; with a path, persisted to that state
    file, which is loaded here: an unreadable one raises StateFileError) or a Redis URL."""
    if url.startswith("memory://"):
        from gateway.store.gcra import Limiter
        from gateway.store.memory import MemoryStore

        return MemoryStore(memory_state_file(url), limiter=Limiter())
    from gateway.store.redis import RedisStore

    return RedisStore(url, key_prefix, timeout_s)


def loaded_state(store: Store) -> dict[str, Any]:
    """What an embedded store loaded from its state file: key count and policy version."""
    from gateway.store.memory import MemoryStore

    assert isinstance(store, MemoryStore)
    return {"keys": len(store.keys),
            "policy_version": store.policy.version if store.policy else None}


__all__ = ["StateFileError", "Store", "loaded_state", "memory_state_file", "open_store"]
