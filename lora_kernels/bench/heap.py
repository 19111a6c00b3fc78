"""What the benchmark does to the C library's allocator on CPU (``--heap``):
``keep_freed_memory`` makes glibc keep freed memory for reuse, so that one
provider's frees are not unmapped and faulted in again inside another
provider's timed step.
"""
from __future__ import annotations

import ctypes
import sys
from typing import Optional

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
HEAPS = ("kept", "default")


def keep_freed_memory() -> Optional[str]:
    """Make glibc keep freed memory for reuse (no heap trimming, no blocks of
    their own mapped per allocation) for the rest of the process.

    With glibc's adaptive defaults, the providers' interleaved steps disturb
    one another: a large block freed by one provider is given back to the OS
    inside whichever provider's step frees the last block above it, and the
    next large allocation page-faults its memory in again (about 4 ms per
    16 MB on the 2-core development machine). Which step pays depends on the
    order of the providers' allocations, so the medians of a run come out
    bimodal. With freed memory kept, every step reuses warm memory and pays
    only for its own work. Returns what was set, or None where the C library
    is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        version = libc.gnu_get_libc_version().decode()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return None
    return (f"glibc {version}, freed memory kept for reuse (mallopt M_MMAP_MAX=0, "
            "M_TRIM_THRESHOLD=2**31-1): no provider pays page faults for memory another freed")
