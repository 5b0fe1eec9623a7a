"""keep_freed_memory: glibc keeps a large freed tensor's memory for the next one instead of giving it back."""

import json
import os
import platform
import subprocess
import sys

import pytest

import evl_hf.allocator
from evl_hf import keep_freed_memory


# Each case runs in a fresh interpreter: the setting is process-wide, and this one must stay as it is. glibc's
# mallinfo2 reports the bytes in mapped chunks (`hblkhd`) and the free bytes kept in the heap (`fordblks`).
PROBE = """
import ctypes, json, sys
import torch
from evl_hf import keep_freed_memory

class MallocInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallocInfo
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
size = 24 * 2**20  # a ViT-B/16 MLP activation for a batch of 8 frames is 19 MB
tensor = torch.ones(size, dtype=torch.uint8)
mapped_while_held = libc.mallinfo2().hblkhd
del tensor
print(json.dumps({"applied": applied, "size": size, "mapped_while_held": mapped_while_held,
                  "kept_after_free": libc.mallinfo2().fordblks}))
"""


def probe(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("GLIBC_TUNABLES", None)  # glibc's defaults, whatever the caller's environment sets
    output = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, check=True)
    return json.loads(output.stdout.splitlines()[-1])


glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the setting is glibc's"
)


@glibc_only
def test_a_freed_tensor_stays_in_the_process_for_the_next_one():
    kept = probe("keep")
    assert kept["applied"] is True
    # Served from the heap, not from a mapping of its own, and still there once freed: the next tensor of that size
    # reuses those pages instead of faulting in new ones.
    assert kept["mapped_while_held"] < kept["size"]
    assert kept["kept_after_free"] >= kept["size"]


@glibc_only
def test_by_default_glibc_gives_the_memory_back():
    # What the setting changes: by default the tensor gets a mapping of its own, unmapped when freed, or comes from
    # the heap and is trimmed off its top.
    default = probe("default")
    assert default["mapped_while_held"] >= default["size"] or default["kept_after_free"] < default["size"]


def test_elsewhere_it_changes_nothing_and_says_so(monkeypatch):
    monkeypatch.setattr(evl_hf.allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert keep_freed_memory() is False
    monkeypatch.setattr(evl_hf.allocator.platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is False
