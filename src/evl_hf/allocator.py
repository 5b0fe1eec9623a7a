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
while it is first written. A video timeline allocates a backbone batch's activations (tens of MB) for every 8
frames, and on the project's 2-core machines those faults cost 5-10% of its time (BENCHMARKS.md, section 9).
`keep_freed_memory()` tells glibc to keep such memory for reuse. The command-line entry points that run timelines
call it; a program calling `video_timeline` or the `"video-timeline"` pipeline can call it itself. It changes the
whole process's allocator, so the library never calls it on its own.
"""

import ctypes
import platform


# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MIB = 2**20


def keep_freed_memory(mmap_threshold_bytes: int = 32 * _MIB, top_pad_bytes: int = 64 * _MIB) -> bool:
    """
    Make glibc keep freed memory for reuse: chunks up to `mmap_threshold_bytes` (at most 32 MiB, glibc's own
    ceiling on 64-bit systems) come from the heap instead of a mapping of their own, the heap's free top is not given
    back below 2 GiB, and the heap grows `top_pad_bytes` at a time. The process's resident memory then stays near its
    peak instead of shrinking between allocations.

    Returns whether the settings were applied: `False` where the C library is not glibc (macOS, Windows, musl), or
    where glibc refused a value.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, mmap_threshold_bytes), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, top_pad_bytes))
    # mallopt returns 1 on success; every setting is tried, so a refused one leaves the others applied.
    return all([mallopt(parameter, value) == 1 for parameter, value in settings])


__all__ = ["keep_freed_memory"]
