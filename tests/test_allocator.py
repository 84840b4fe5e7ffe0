"""The daemon's allocator settings (gateway.allocator), observed in a fresh interpreter
through glibc's own accounting (mallinfo2): memory freed stays in the heap for reuse,
and a 2 MiB buffer comes from the heap instead of a mapping of its own."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import ctypes, ctypes.util, sys
from gateway.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "tuned" else []
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
before = libc.mallinfo2()
big = libc.malloc(2 << 20)
mapped = libc.mallinfo2().hblkhd - before.hblkhd  # in blocks mapped on their own
libc.free(big)
blocks = [libc.malloc(64 << 10) for _ in range(160)]  # 10 MiB of the heap
for block in reversed(blocks):
    libc.free(block)
print(",".join(applied) or "-", mapped, libc.mallinfo2().arena - before.arena)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")


def _probe(mode: str, **env: str) -> tuple[str, int, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=REPO, env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_freed_memory_is_kept_and_megabyte_buffers_come_from_the_heap() -> None:
    applied, mapped, heap = _probe("default")
    assert mapped >= 2 << 20 and heap < 5 << 20  # glibc's own: mapped apart, most of the heap given back
    applied, mapped, heap = _probe("tuned")
    assert applied == "MALLOC_TRIM_THRESHOLD_,MALLOC_TOP_PAD_,MALLOC_MMAP_THRESHOLD_"
    assert mapped == 0 and heap >= 10 << 20


def test_what_an_admin_set_in_the_environment_wins() -> None:
    applied, mapped, heap = _probe("tuned", MALLOC_MMAP_THRESHOLD_="1048576")
    assert applied == "MALLOC_TRIM_THRESHOLD_,MALLOC_TOP_PAD_"
    assert mapped >= 2 << 20 and heap >= 10 << 20  # mapped apart, as the admin asked
