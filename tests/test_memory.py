"""Memory a finished build freed goes back to the system (glibc keeps freed heap pages otherwise)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from kd_lightning.memory import _malloc_trim, release_freed_memory


def anonymous_mib() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux") or _malloc_trim() is None, reason="glibc only")
def test_heap_pages_freed_by_mid_sized_tensors_go_back_to_the_system():
    large = torch.ones(30 * 2**18)  # 30 MiB: freeing it raises glibc's mmap threshold to its size ...
    del large
    blocks = [torch.ones(2**20) for _ in range(64)]  # ... so these 4 MiB tensors come from the heap
    last = blocks.pop()  # the heap's top stays in use: freeing the rest cannot shrink it from the end
    del blocks
    kept = anonymous_mib()
    assert release_freed_memory()
    released = kept - anonymous_mib()
    assert released > 150, f"{released:.0f} MiB of 252 MiB freed went back to the system"
    assert float(last.sum()) == 2**20  # the block still in use is untouched
