"""The Redis backend: the store's semantics (store.py) over a transport that runs its scripts
(runner.py): redis-py's pool (pooled.py) or one pipelined connection (pipelined.py)."""

from gateway.store.redis.store import RedisStore

__all__ = ["RedisStore"]
