"""Keep freed heap memory in the process instead of handing it back to the OS (glibc only).

A training step frees and allocates the same large tensors every step. By default glibc gives
blocks above a moving threshold back to the OS on free (munmap, heap trimming), and the next
step pays a page fault for every 4 KiB it touches again: on the 2-core CPU of bench/ a
ResNet-8 search step alone in its process took 31 ms with 8,000 page faults, 23 ms without
them (the float step 20 -> 13 ms). Raising both thresholds keeps the memory mapped (a
process then holds on to its peak heap, which the next step reuses).

`python -m fxsearch.search` (and so `make demo`) and bench/step_overhead.py call keep_freed_memory();
library users may call it at the start of their training script. It leaves the allocator
alone where the environment sets either threshold (GLIBC_TUNABLES, MALLOC_TRIM_THRESHOLD_,
MALLOC_MMAP_THRESHOLD_) and off glibc (macOS, Windows, musl): there it returns False.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
# Blocks from this size up still come from mmap: 32 MiB is the largest threshold glibc accepts
# on 64-bit systems (a larger value makes mallopt fail).
MMAP_THRESHOLD = 32 << 20
# Free memory at the top of the heap is given back above this much.
TRIM_THRESHOLD = 1 << 30


def _user_configured() -> bool:
    """Whether the environment sets either threshold (which then stays as the user chose)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return ("trim_threshold" in tunables or "mmap_threshold" in tunables
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ)


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; True where they were set."""
    if _user_configured():
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
