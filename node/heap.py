"""The worker's heap: freed memory kept for the next series instead of handed back to the kernel and faulted in again.

A series job allocates and frees a few hundred MB of numpy arrays (the volume, masks, the SEG's frames). glibc's
defaults return large blocks to the kernel as soon as they are freed (``mmap``/``munmap`` above a threshold that
adapts, and ``trim`` of the heap's top above 128 KiB), so the next series touches fresh pages again: on the 2-core
VM that costs ~0.1–0.2 s per 120 × 512² series (`make bench-e2e`, README "After the last slice").
`retain_freed_memory(mb)` raises both thresholds (``mallopt``) so that up to ``mb`` MiB of freed memory stays in
the process for reuse; blocks above it still go back. Peak memory does not grow — only what is returned between
jobs. Since large arrays then live in the heap, a block held after a very large series could keep more than that
freed below it; `release_beyond(mb)`, which the worker calls after each job, hands everything free back
(``malloc_trim``) when more than ``mb`` MiB lie free. ``[worker] retain_heap_mb`` (0: glibc's defaults). Both are
no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (with ``mallinfo2``'s result type set where it has one), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc's, or not glibc
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


def retain_freed_memory(mb: int) -> bool:
    """Keep up to ``mb`` MiB of freed memory in the process (see the module docstring); True when applied."""
    libc = _glibc() if mb > 0 else None
    if libc is None:
        return False
    limit = min(mb, 2047) << 20  # an int parameter
    return bool(libc.mallopt(M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit))


def free_heap_bytes() -> int | None:
    """Bytes free in the process's malloc arenas (``mallinfo2``, glibc ≥ 2.33), None where unknown."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def release_beyond(mb: int) -> bool:
    """Hand free memory back to the kernel when more than ``mb`` MiB lie free (``mb`` ≤ 0: never); True when it
    did."""
    free = free_heap_bytes() if mb > 0 else None
    if free is None or free <= mb << 20:
        return False
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))


__all__ = ["free_heap_bytes", "release_beyond", "retain_freed_memory"]
