"""The worker's heap: freed memory kept for the next series instead of handed back to the kernel and faulted in again.

A series job allocates and frees a few hundred MB of numpy arrays (the volume, masks, the SEG's frames). glibc's
defaults return large blocks to the kernel as soon as they are freed (``mmap``/``munmap`` above a threshold that
adapts, and ``trim`` of the heap's top above 128 KiB), so the next series touches fresh pages again: on the 2-core
VM that costs ~0.1–0.2 s per 120 × 512² series (`make bench-e2e`, README "After the last slice").
`retain_freed_memory(mb)` raises both thresholds (``mallopt``) so that up to ``mb`` MiB of freed memory stays in
the process for reuse; blocks above it still go back. Peak memory does not grow — only what is returned between
jobs. ``[worker] retain_heap_mb`` (0: glibc's defaults). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def retain_freed_memory(mb: int) -> bool:
    """Keep up to ``mb`` MiB of freed memory in the process (see the module docstring); True when applied."""
    if mb <= 0:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False  # not glibc: nothing to tune
    limit = min(mb, 2047) << 20  # an int parameter
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, limit))


__all__ = ["retain_freed_memory"]
