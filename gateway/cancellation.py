"""Background-task helpers: loops that end when cancelled, and bounded waits for them.

A cancellation that arrives while a timeout fires inside a library call can come back as a
TimeoutError (asyncio.timeout on Python 3.11 does this, and redis-py uses it); a loop that
handles that error would then sleep on, and `stop` would wait for it forever. So loops ask
the task itself whether it is being cancelled, and stops wait a bounded time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


def cancelling() -> bool:
    """Whether the current task has been asked to cancel (even if the error was swallowed)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]], wait_s: float = 5.0) -> None:
    """Cancel `tasks` and wait for them, at most `wait_s` seconds."""
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        done, _ = await asyncio.wait(pending, timeout=wait_s)
        for t in done:
            if not t.cancelled():
                t.exception()  # retrieved: a failure on the way out is not worth a warning
