"""fxsearch.malloc: freed tensor memory stays mapped, so allocating it again costs no page faults."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and frees 96 tensors of 1 MiB four times; prints the page faults of the last round.
# 96 MiB: above twice the 32 MiB top of glibc's dynamic mmap threshold, the most it keeps
# untrimmed by default.
_ROUNDS = """
import resource, sys, torch
from fxsearch.malloc import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(256 * 1024) for _ in range(96)]
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_is_reused_without_page_faults():
    # whether glibc hands the memory back by default also depends on what else sits on its heap
    # (it kept it in 2 of 5 runs here): the most faults of three tries
    default = max(_last_round("default")[1] for _ in range(3))
    if default < 8000:  # 96 MiB in 4 KiB pages: 24,576 faults where glibc hands the memory back
        pytest.skip(f"this allocator keeps freed memory by itself ({default} page faults)")
    applied, kept = _last_round("keep")
    assert applied == "True"
    assert kept < 1000, (default, kept)


def test_a_threshold_set_in_the_environment_is_left_alone():
    applied, _ = _last_round("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
    applied, _ = _last_round("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert applied == "False"
