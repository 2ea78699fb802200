"""Keep freed receive buffers in the process: no page faults per message.

ZeroMQ allocates every received message with ``malloc`` (in its I/O thread) and frees
it when Python drops the frame. glibc serves a 4 MiB block from ``mmap`` until one has
been freed, and gives the free top of its heap back to the kernel once it exceeds twice
that (``M_TRIM_THRESHOLD``). A push or a reply of a model's partitions is freed in
order, so the heap's top was handed back after every step and touched again, page by
page, on the next one: a ``munmap`` in the thread that drops the frame, and thousands of
minor faults in the one that fills the next (benchmarks/README.md, ps_roundtrip.py:
20% of the CPU of a 25M push+pull).

:func:`retain_freed_memory` fixes glibc's thresholds instead (``mallopt``): blocks up
to 32 MiB (the most glibc allows) come from the heap, and up to 512 MiB of free heap
stays with the process. It is a process-wide setting, made once per process by the
parameter server and the PS client; on a C library without ``mallopt`` (not glibc) it
does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

#: glibc's ``mallopt`` parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks below this come from the heap (glibc's maximum, HEAP_MAX_SIZE / 2 on 64-bit).
MMAP_THRESHOLD_BYTES = 32 << 20
#: Free heap kept before any is returned to the kernel.
TRIM_THRESHOLD_BYTES = 512 << 20


def retain_freed_memory() -> bool:
    """Set glibc's thresholds (module docstring); True when it took effect."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
