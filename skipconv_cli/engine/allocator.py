"""Freed tensors' memory kept in the process, so that a frame's maps do not page-fault in anew every frame.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its mmap threshold (128 KB at first,
raised as such blocks are freed, at most 32 MB) with a fresh ``mmap`` and returns it to the kernel when it is
freed, and it trims the top of its heap once more than twice that threshold lies free there. A model that
allocates its activations anew every frame then pays a page fault for every 4 KB of them, every frame:
openpose-mbv2-14's dense model at 368x432, 2 threads, ~12,600 faults and 49-50 ms a frame, 0 faults and
34-36 ms with the thresholds below; yolox-nano 416: 13 vs 10-11 ms. How much a run page-faulted depended on
which blocks it had freed before (the thresholds move), so the dense side of a comparison ran 35 or 50 ms
a frame depending on what ran between its frames. With fixed thresholds both sides of a comparison run
without those faults.
"""

from __future__ import annotations

import ctypes
import functools
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit: blocks up to here come from the heap
TRIM_THRESHOLD = 256 << 20  # free memory kept at the heap's top (a few frames' worth of large maps)


@functools.cache
def keep_freed_memory() -> bool:
    """Fixes glibc's thresholds (above) for this process: a block up to 32 MB comes from the heap, and up to
    256 MB of freed memory stay there for the next frame. Returns whether they were set (glibc only;
    elsewhere the allocator is left as it is). The process keeps its peak heap size, as a long-running
    inference process does anyway."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
