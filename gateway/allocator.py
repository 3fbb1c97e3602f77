"""Allocator tuning for a gateway process: blocks as large as request bodies go back to the
operating system when freed, so memory returns to its baseline after a burst of large bodies.

glibc raises its mmap threshold after the first large free (up to 32 MiB), after which 30 MB
bodies come from the heap and the heap is not trimmed: resident memory stays at its peak.
Fixing the thresholds turns that off. Elsewhere (musl, macOS) this does nothing."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LARGE_BLOCK = 256 * 1024


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Serve blocks of `threshold` bytes or more by mmap and trim the heap past twice that;
    True when the C library took both settings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
        mallopt(M_TRIM_THRESHOLD, 2 * threshold))
