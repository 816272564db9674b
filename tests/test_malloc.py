"""fxsearch.malloc: freed tensor memory stays mapped, so allocating it again costs no page faults."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Allocates and frees 64 tensors of 1 MiB four times; prints the page faults of the last round.
# It first pins glibc's thresholds to their static defaults (128 KiB: 1 MiB blocks are mmapped
# and unmapped on free). Left to glibc, they move with what the process freed before, and the
# default kept the memory in about half the runs, which made the comparison a coin toss.
_ROUNDS = """
import ctypes, resource, sys, torch
from fxsearch.malloc import keep_freed_memory
libc = ctypes.CDLL(None)
assert libc.mallopt(-3, 128 * 1024) and libc.mallopt(-1, 128 * 1024)  # M_MMAP_ / M_TRIM_THRESHOLD
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(256 * 1024) for _ in range(64)]
    del tensors
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, faults)
"""


def _last_round(mode: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_",
                                                               "MALLOC_MMAP_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], env={**environ, **env}, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0], int(out[1])


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator")


@glibc
def test_freed_memory_is_reused_without_page_faults():
    _, default = _last_round("default")
    assert default > 8000  # 64 MiB in 4 KiB pages: 16,384 faults where glibc hands the memory back
    applied, kept = _last_round("keep")
    assert applied == "True"
    assert kept < 1000, (default, kept)


@glibc
def test_a_threshold_set_in_the_environment_is_left_alone():
    applied, _ = _last_round("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    applied, _ = _last_round("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert applied == "False"
