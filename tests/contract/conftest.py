"""The `store` fixture of the contract suite: one started store per backend (the embedded
store, the embedded store on a state file, a real redis-server, a real three-master Redis
Cluster, Redis through a real Sentinel)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from gateway.store import Store, open_store

BACKENDS = ["memory", "memory-file", "redis", "cluster", "sentinel"]


@pytest_asyncio.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """A started store of one backend; the Redis ones share a session server under a prefix
    of this test alone (never flushed)."""
    prefix = f"c{uuid.uuid4().hex[:12]}:"
    if request.param == "memory":
        url = "memory://"
    elif request.param == "memory-file":
        url = f"memory://{request.getfixturevalue('tmp_path')}/state.json"
    elif request.param == "redis":
        url = request.getfixturevalue("redis_server_session").url
    elif request.param == "sentinel":
        url = request.getfixturevalue("redis_sentinel").url
    else:
        url = request.getfixturevalue("redis_cluster").url
    st = open_store(url, prefix)
    await st.start()
    try:
        yield st
    finally:
        await st.close()
