"""The gateway's background loops, each run as an aiohttp cleanup context: started when the
application that holds it starts, cancelled (with a bounded wait) when it is cleaned up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gateway.cancellation import cancel_and_wait, cancelling
from gateway.log import logger

#: An aiohttp cleanup context (an entry of `web.Application.cleanup_ctx`).
CleanupContext = Callable[[web.Application], AsyncIterator[None]]


class Loops:
    """Periodic loops as cleanup contexts; `tasks` holds the ones running."""

    def __init__(self, wait_s: float = 0.5) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self._wait_s = wait_s

    def every(self, name: str, interval_s: Callable[[], float],
              step: Callable[[], Awaitable[None]]) -> CleanupContext:
        """A cleanup context running `step` every `interval_s()` seconds (read before each
        wait, so a reload may change it) until the application is cleaned up. `step` handles
        its own errors; one it lets through (a bug) is logged and the loop goes on."""

        async def run() -> None:
            while not cancelling():
                await asyncio.sleep(interval_s())
                try:
                    await step()
                except Exception as exc:  # a loop that died would stop its duty for good
                    logger().error("loop_step_failed", loop=name, error=type(exc).__name__,
                                   detail=str(exc)[:200])

        async def context(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.create_task(run(), name=name)
            self.tasks.append(task)
            try:
                yield
            finally:
                self.tasks.remove(task)
                await cancel_and_wait([task], wait_s=self._wait_s)

        return context
