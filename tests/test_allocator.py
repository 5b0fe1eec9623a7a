"""keep_freed_memory: glibc keeps large freed tensors' memory for the next ones instead of giving it back."""

import json
import os
import subprocess
import sys

import pytest

import evl_hf.allocator
from evl_hf import keep_freed_memory


# Each case runs in a fresh interpreter: the setting is process-wide, and this one must stay as it is. Three 24 MiB
# tensors (a ViT-B/16 MLP activation for 8 frames is 19 MB) are held, then freed. glibc's mallinfo2 (glibc 2.33+)
# reports the bytes in chunks mapped on their own (`hblkhd`) and the free bytes kept in the heap (`fordblks`). Page
# faults would be the direct measure, but whether glibc's defaults fault on a given round depends on the heap's
# history (its thresholds adapt), so the test checks the two settings that decide it instead.
PROBE = """
import ctypes, json, sys
import torch
from evl_hf import keep_freed_memory

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print(json.dumps(None))
    sys.exit()

class MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc.mallinfo2.restype = MallocInfo
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
held = [torch.ones(24 * 2**20, dtype=torch.uint8) for _ in range(3)]
mapped_while_held = libc.mallinfo2().hblkhd
del held
print(json.dumps({"applied": applied, "mapped_while_held": mapped_while_held,
                  "kept_after_free": libc.mallinfo2().fordblks}))
"""
SIZE = 3 * 24 * 2**20


def probe(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in [name for name in env if name == "GLIBC_TUNABLES" or name.startswith("MALLOC_")]:
        env.pop(name)  # glibc's defaults, whatever the caller's environment sets
    output = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(output.stdout.splitlines()[-1])


def is_glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (AttributeError, ValueError, OSError):
        return False


glibc_only = pytest.mark.skipif(not is_glibc(), reason="the setting is glibc's")


@glibc_only
def test_freed_tensors_stay_in_the_process_for_the_next_ones():
    kept = probe("keep")
    if kept is None:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    assert kept["applied"] is True
    # Served from the heap, not from mappings of their own (the mmap threshold), and still there once freed (the trim
    # threshold): the next tensors of those sizes reuse those pages instead of faulting in new ones.
    assert kept["mapped_while_held"] < SIZE
    assert kept["kept_after_free"] >= SIZE


@glibc_only
def test_by_default_glibc_gives_the_memory_back():
    # What the setting changes: by default the tensors get mappings of their own, unmapped when freed, or come from
    # the heap and are trimmed off its top.
    default = probe("default")
    if default is None:
        pytest.skip("glibc before 2.33 has no mallinfo2")
    assert default["mapped_while_held"] >= SIZE or default["kept_after_free"] < SIZE


def test_elsewhere_it_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(evl_hf.allocator.os, "confstr", lambda name: None)  # e.g. musl
    assert keep_freed_memory() is False

    def no_such_name(name):
        raise ValueError("unrecognized configuration name")

    monkeypatch.setattr(evl_hf.allocator.os, "confstr", no_such_name)
    assert keep_freed_memory() is False


def test_values_glibc_would_refuse_or_truncate_are_refused():
    with pytest.raises(ValueError, match="mmap_threshold_bytes"):
        keep_freed_memory(mmap_threshold_bytes=64 * 2**20)
    with pytest.raises(ValueError, match="top_pad_bytes"):
        keep_freed_memory(top_pad_bytes=2**32)
