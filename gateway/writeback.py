"""Early writeback of received data (Linux ``sync_file_range``).

A C-STORE may only be answered after its file is fsynced. Starting the disk write of
each fragment as it arrives overlaps disk I/O with the network transfer, so the final
fsync only has to wait for the tail. Where the call is unavailable this is a no-op
and the final fsync does all the work, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

SYNC_FILE_RANGE_WRITE = 2

_libc = None
if os.name == "posix":
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _sync_file_range = _libc.sync_file_range
        _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
        _sync_file_range.restype = ctypes.c_int
    except (OSError, AttributeError):
        _libc = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing this range to disk now, without waiting."""
    if _libc is not None:
        _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)
