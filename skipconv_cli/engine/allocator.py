"""Freed tensors' memory kept in the process, so that a frame's maps do not page-fault in anew every frame.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KB at first,
raised as such blocks are freed, at most 32 MB) with a fresh ``mmap`` and returns it to the kernel when it is
freed, and it trims the top of its heap once more than twice that threshold lies free there. A model that
allocates its activations anew every frame then pays a page fault for every 4 KB of them, every frame:
openpose-mbv2-14's dense model at 368x432, 2 threads, ~12,600 faults and 49-50 ms a frame, 0 faults and
34-36 ms with the setting below; yolox-nano 416: 13 vs 10-11 ms. How much a run page-faulted depended on
which blocks it had freed before (the thresholds move), so the dense side of a comparison ran 35 or 50 ms
a frame depending on what ran between its frames. Set so, both sides of a comparison run without those
faults.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top (many frames' worth of large maps)


@functools.cache
def keep_freed_memory() -> bool:
    """Sets glibc's allocator for this process: no block is mapped on its own (``M_MMAP_MAX`` 0: every block
    comes from the heap, whatever its size: the largest mmap threshold glibc accepts, 32 MB, left a batch of
    four openpose-mbv2-14 frames, whose largest maps are ~90 MB, at 45,000 faults and 175 ms a batch, 133 ms
    without), and up to 1 GB of freed memory stays at the heap's top for the next frame. Returns whether it
    was set (glibc only; elsewhere the allocator is left as it is). The process keeps its peak heap size, as a
    long-running inference process does anyway."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
