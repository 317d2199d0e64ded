"""Keep freed memory in the process instead of handing it back to the kernel (glibc only).

A broker allocates and frees buffers of hundreds of KiB to MiB all the time: fetch reads,
reply frames, a consumer's receive buffer. glibc serves those from ``mmap`` (above its
dynamic threshold) or trims the heap top back to the kernel once 128 KiB are free, so the
next buffer of that size starts on pages the kernel must fault in and zero again. On this
Firecracker VM that is expensive: a consumer reading 1.5M records of 200 B took 175,000
minor page faults and 0.63 s of system time; with the thresholds below, 6,000 faults and
0.07 s, and 1.3M instead of 0.8M records/s (tests/unit/broker/test_malloc.py shows the
effect on faults). The cost is that up to ``trim_bytes`` of freed memory stays with the
process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
TRIM_BYTES: Final = 256 * 1024 * 1024
MMAP_BYTES: Final = 32 * 1024 * 1024  # glibc's ceiling for the mmap threshold on 64-bit


def keep_freed_memory(trim_bytes: int = TRIM_BYTES, mmap_bytes: int = MMAP_BYTES) -> bool:
    """Allocations below ``mmap_bytes`` come from the heap, and the heap keeps up to
    ``trim_bytes`` free before returning any. Returns False where this is not glibc (the
    defaults then stay)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(
        mallopt(M_TRIM_THRESHOLD, trim_bytes)
    )
