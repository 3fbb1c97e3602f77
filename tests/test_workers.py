"""Unit tests for gateway.workers: the worker count each worker process is told."""

from __future__ import annotations

import pytest

from gateway.workers import WORKERS_ENV, worker_count


@pytest.mark.parametrize(("value", "count"), [(None, 1), ("1", 1), ("4", 4), ("0", 1),
                                              ("-2", 1), ("x", 1), ("", 1)])
def test_worker_count_from_the_environment(value: str | None, count: int) -> None:
    """A process not started by the supervisor counts as one worker; a bad value too."""
    environ = {} if value is None else {WORKERS_ENV: value}
    assert worker_count(environ) == count
