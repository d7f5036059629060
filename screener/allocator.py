"""glibc's allocator told to keep freed memory for the next job instead of handing it back.

Every job of a stage worker allocates the same large arrays again: an 8 MB pixel buffer
and its 8 MB copy for a 2048-px film, display and work images, encoded outputs. With
glibc's defaults a freed block that large goes back to the kernel (``munmap``, or a trim of
the heap top) and the next job's block is faulted in and zeroed again, page by page: for
pydicom's own ``dcmread`` + ``pixel_array`` of such a film that is 5 of its 6 ms of CPU
(measured here with ``mallopt`` in the same process: 6.3 -> 1.2 ms). Worker processes
therefore keep what they freed, up to :data:`TRIM_THRESHOLD` at the top of the heap, and
serve blocks up to :data:`MMAP_THRESHOLD` from the heap. Peak memory is unchanged (a
process cannot keep more than it once used); an idle worker stays at its peak instead of
shrinking.

Not used in the listener: its receive buffers grow by ``realloc``, which for a block
served by ``mmap`` is a remap, not a copy (``benchmarks/pipeline.py``: listen 23 -> 29-33 ms
per study with heap-served buffers).

Left alone where the operator chose: if a ``MALLOC_*_`` variable or a ``glibc.malloc``
tunable is set, or on a C library without ``mallopt`` (musl, macOS).
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

#: Blocks up to this size come from the heap (glibc refuses more than 32 MiB on 64 bits).
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory kept at the top of the heap before it is returned to the kernel.
TRIM_THRESHOLD = 256 * 1024 * 1024

_done = False


def operator_chose() -> bool:
    """True when the environment already configures glibc's allocator."""
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return True
    return "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Set the thresholds above once per process; True when they are in force."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or operator_chose():
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # no C library symbols, or not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if ok:
        _done = True
        log.debug("allocator keeps freed memory (mmap %d, trim %d)", MMAP_THRESHOLD, TRIM_THRESHOLD)
    return ok
