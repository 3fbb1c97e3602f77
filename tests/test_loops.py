"""Unit tests for gateway.loops: a loop runs as a cleanup context of a real aiohttp
application, from its startup to its cleanup."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.loops import Loops
from tests.support.gateway import poll


async def test_a_loop_runs_from_startup_to_cleanup() -> None:
    """The step runs again and again once the application has started, the task is listed
    while it runs, and cleanup cancels it and removes it from the list."""
    loops = Loops()
    steps: list[float] = []

    async def step() -> None:
        steps.append(asyncio.get_running_loop().time())

    app = web.Application()
    app.cleanup_ctx.append(loops.every("ticker", lambda: 0.01, step))
    assert loops.tasks == []
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        [task] = loops.tasks
        assert task.get_name() == "ticker"
        await poll(lambda: len(steps) >= 3)
    finally:
        await runner.cleanup()
    assert loops.tasks == [] and task.done()
    count = len(steps)
    await asyncio.sleep(0)  # a cancelled loop takes no further step
    assert len(steps) == count


async def test_the_interval_is_read_before_each_wait() -> None:
    """A changed interval applies from the next wait on (a reload may change it)."""
    loops = Loops()
    intervals = iter([0.01, 0.01, 3600.0])
    steps: list[int] = []

    async def step() -> None:
        steps.append(1)

    app = web.Application()
    app.cleanup_ctx.append(loops.every("slowing", lambda: next(intervals), step))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await poll(lambda: len(steps) == 2)
        assert loops.tasks and not loops.tasks[0].done()  # waiting its hour, still alive
    finally:
        await runner.cleanup()
    assert len(steps) == 2
