"""gateway.allocator: the thresholds are set where the C library offers mallopt."""

from __future__ import annotations

import ctypes.util
import sys

from gateway.allocator import return_large_blocks


def test_thresholds_are_taken_on_glibc() -> None:
    """On Linux with glibc both settings are accepted; elsewhere the call is a harmless no."""
    libc = ctypes.util.find_library("c") or ""
    expected = sys.platform.startswith("linux") and "libc.so" in libc
    assert return_large_blocks() is expected
