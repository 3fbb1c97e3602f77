"""gateway.store.redis.runner: the script record and the one mapping of transport failures
to StoreError (the transports themselves: test_pooled.py, test_pipelined.py)."""

from __future__ import annotations

import hashlib

import pytest

from gateway.errors import StoreError
from gateway.store.redis.pipelined import PipelinedRunner
from gateway.store.redis.pooled import PooledRunner
from gateway.store.redis.runner import Script, ScriptRunner, error_reply, unavailable


def test_a_script_carries_the_sha1_redis_knows_it_by() -> None:
    """A script's SHA is the SHA-1 hex digest of its UTF-8 source, as SCRIPT LOAD answers."""
    script = Script("s", "return 'é'")
    assert script.sha == hashlib.sha1("return 'é'".encode()).hexdigest()
    with pytest.raises(AttributeError):
        script.sha = "0" * 40  # type: ignore[misc]


def test_an_error_reply_keeps_only_its_first_word() -> None:
    """The condition (first word, at most 40 characters) is kept; the rest, which may echo
    arguments, is not."""
    err = error_reply("OOM command not allowed for secret-value")
    assert isinstance(err, StoreError) and str(err) == "store error: OOM"
    assert str(error_reply("X" * 60 + " tail")) == "store error: " + "X" * 40


def test_any_other_failure_is_named_by_its_type_only() -> None:
    """A failure that is no error reply is `store unavailable: <type>`, never its text."""
    err = unavailable(ConnectionResetError("peer 10.0.0.1 secret-value"))
    assert str(err) == "store unavailable: ConnectionResetError"


def test_both_transports_are_script_runners() -> None:
    """The pooled and the pipelined transports have what the store calls on a runner."""
    runners: list[ScriptRunner] = [PooledRunner("redis://127.0.0.1:1/0", 1.0),
                                   PipelinedRunner("redis://127.0.0.1:1/0", 1.0)]
    for r in runners:
        assert callable(r.run) and callable(r.close)
