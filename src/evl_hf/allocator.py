# Copyright 2026 The evl-hf authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Keeping freed memory in the process, for long CPU jobs that allocate the same large tensors again and again.

glibc's malloc returns freed memory to the system: chunks above its mmap threshold are unmapped when freed, and the
free top of the heap is trimmed. A tensor of the same size allocated again then costs a page fault per 4 kB page
while it is first written. A video timeline allocates a backbone batch's activations (tens of MB) for every 8 frames;
on the project's 2-core machines a tower batch run right after timeline work took 100,000-160,000 such faults and
8-13% more time than one in a job of its own (BENCHMARKS.md, section 9). `keep_freed_memory()` tells glibc to keep
such memory for reuse. `python -m evl_hf.timeline` calls it for its own process; a program calling `video_timeline`
or the `"video-timeline"` pipeline can call it itself. It changes the whole process's allocator (every thread's
arena then stays at its peak), so the library never calls it on its own.
"""

import ctypes
import os


# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MIB = 2**20
_MAX_MMAP_THRESHOLD = 32 * _MIB  # glibc's ceiling on 64-bit systems (HEAP_MAX_SIZE / 2); larger values are refused
_C_INT_MAX = 2**31 - 1


def keep_freed_memory(mmap_threshold_bytes: int = _MAX_MMAP_THRESHOLD, top_pad_bytes: int = 64 * _MIB) -> bool:
    """
    Make glibc keep freed memory for reuse: chunks up to `mmap_threshold_bytes` (at most 32 MiB) come from the heap
    instead of a mapping of their own, the heap's free top is not given back below 2 GiB, and the heap grows
    `top_pad_bytes` at a time. The process's resident memory then stays near its peak instead of shrinking between
    allocations. Tensors over 32 MiB still get mappings of their own (glibc allows no more), so the gain is for
    activations under that size: a ViT-B/16 batch of 8 frames, not a ViT-L/14 one.

    These settings replace any `MALLOC_*_` or `GLIBC_TUNABLES` values given to the process. Returns whether they were
    applied: `False` where the C library is not glibc (macOS, Windows, musl), or where glibc refused a value. With
    another allocator preloaded (jemalloc, tcmalloc) glibc's settings are accepted but change nothing.
    """
    if not 0 < mmap_threshold_bytes <= _MAX_MMAP_THRESHOLD:
        raise ValueError(f"`mmap_threshold_bytes` must be in (0, {_MAX_MMAP_THRESHOLD}], got {mmap_threshold_bytes}.")
    if not 0 <= top_pad_bytes <= _C_INT_MAX:
        raise ValueError(f"`top_pad_bytes` must be in [0, {_C_INT_MAX}], got {top_pad_bytes}.")
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (AttributeError, ValueError, OSError):  # no confstr, or no such name: not glibc
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = (
        (_M_MMAP_THRESHOLD, mmap_threshold_bytes), (_M_TRIM_THRESHOLD, _C_INT_MAX), (_M_TOP_PAD, top_pad_bytes)
    )
    # mallopt returns 1 on success; every setting is tried, so a refused one leaves the others applied.
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])


__all__ = ["keep_freed_memory"]
