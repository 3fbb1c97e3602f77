"""Unit tests for gateway.cancellation: loops see their own cancellation, stops are bounded."""

from __future__ import annotations

import asyncio

from gateway.cancellation import cancel_and_wait, cancelling


async def test_cancelling_is_false_in_a_task_not_asked_to_cancel() -> None:
    """A running task that nobody cancelled is not cancelling."""
    assert cancelling() is False


async def test_cancelling_is_seen_even_when_the_error_is_swallowed() -> None:
    """A loop that swallows CancelledError still learns, through cancelling(), to stop."""
    seen: list[bool] = []
    started = asyncio.Event()

    async def loop() -> None:
        while True:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # as a library that turns it into a TimeoutError would
            if cancelling():
                seen.append(True)
                return

    task = asyncio.create_task(loop())
    await started.wait()
    task.cancel()
    await asyncio.wait_for(task, 30)
    assert seen == [True]


async def test_cancel_and_wait_cancels_pending_and_leaves_done_tasks() -> None:
    """Pending tasks are cancelled and awaited; a finished one keeps its result."""
    done = asyncio.create_task(asyncio.sleep(0, result="r"))
    await done
    pending = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait([done, pending])
    assert pending.cancelled()
    assert done.result() == "r"


async def test_cancel_and_wait_does_not_wait_forever_for_a_task_that_will_not_end() -> None:
    """A task that ignores cancellation is left behind after wait_s, not waited for."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await cancel_and_wait([task], wait_s=0.05)
    assert not task.done()
    release.set()
    await asyncio.wait_for(task, 30)
    assert task.done()


async def test_a_failure_on_the_way_out_is_retrieved() -> None:
    """A task that fails while being cancelled does not raise out of cancel_and_wait."""
    started = asyncio.Event()

    async def fails_on_cancel() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("boom") from None

    task = asyncio.create_task(fails_on_cancel())
    await started.wait()
    await cancel_and_wait([task])
    assert isinstance(task.exception(), RuntimeError)
