"""Process memory: what a run reports about it, and one allocator setting that bounds it.

A model pruned layer by layer allocates and frees many matrices of tens of MiB. glibc's
allocator raises its mmap threshold after each such free, so later ones come from the heap,
where freed memory is kept for reuse rather than returned: on a random 1.1B LLaMA in bf16 a
client's job peaked at 1.57x the model instead of 1.32x (docs/benchmarks.md, issue 10).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20  # allocations from here up are mapped, and unmapped when freed


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark, in MiB (what sizing a machine needs)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB, so freed matrices go back to the system; ``False``
    where the C library is not glibc (nothing to do there)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
