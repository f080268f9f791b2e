"""Process-level settings for the compute worker (training, inference, benchmarks). Standard library only."""

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it.

    A training step allocates and frees the same large activation buffers every iteration; by default each one is
    mmap'ed and unmapped, so every step pays for page faults and zeroing (measured: 5.4 s -> 3.1 s per `small` MiM
    step on 2 cores, system time 18 s -> 3 s). Peak memory is unchanged; it is simply not returned between steps.
    Returns False where it does not apply (not Linux with glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**40))
    except (OSError, AttributeError):
        return False
