"""What the Redis store asks of a transport: run a Lua script by SHA, and close; and the one
mapping of a transport's failures to StoreError."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.errors import StoreError


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script as sent to Redis: its name (for messages), its source and its SHA-1."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


class ScriptRunner(Protocol):
    """A connection (or pool) to one Redis deployment that runs scripts."""

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """`script`'s reply to `keys` and `args`: sent as EVALSHA, and again with the source
        when Redis answers NOSCRIPT (after SCRIPT FLUSH or a restart). Every failure is a
        StoreError: an error reply is `store error: <KIND>` (its first word: READONLY, OOM,
        ...), anything else `store unavailable: <reason>`; StoreCallNotSent when nothing of
        the call left this process. A call never waits past the runner's own deadline."""
        ...

    def before_flush(self, producer: Callable[[], None]) -> bool:
        """Have `producer` called right before the runner's next socket write, in this loop
        turn or the next, so that what it submits leaves in that write; False (calling
        nothing) when the runner buffers nothing or is not connected."""
        ...

    def submit(self, script: Script, keys: Sequence[str], args: Sequence[Any],
               done: Callable[[Any, BaseException | None], None]) -> bool:
        """Start `run` without a task: `done(reply, None)` or `done(None, error)` is called
        with its outcome. False (calling nothing) when the runner cannot (not connected, or
        no buffered connection): then `run`."""
        ...

    async def close(self) -> None:
        """Release the connections; calls still waiting fail with StoreError."""
        ...


def error_reply(text: str) -> StoreError:
    """The StoreError of an error reply: its first word names the condition (OOM, READONLY,
    NOSCRIPT, MASTERDOWN, ...); the rest may echo arguments, so it is dropped."""
    return StoreError(f"store error: {text.split(' ', 1)[0][:40]}")


def unavailable(exc: BaseException) -> StoreError:
    """The StoreError of any other failure (no connection, a timeout, a reply of the wrong
    shape): named by the exception's type, never by its text."""
    return StoreError(f"store unavailable: {type(exc).__name__}")
