"""One daemon per spool directory.

A second ``dicom-gateway run`` on the same spool would run `Spool.recover` against
the first one's live state: delete the files it is still receiving and requeue the
rows it is sending. So the daemon takes an exclusive ``flock`` on a file in the spool
directory before it touches anything else there, and holds it until it exits; the
kernel drops the lock when the process dies, however it dies, so a stale lock file
never blocks a restart. The holder's pid is written into the file, for the message a
second daemon prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

LOCK_FILE = "gateway.lock"


class SpoolLocked(Exception):
    """Another process holds the spool directory's lock."""


class SpoolLock:
    """``with SpoolLock(directory):`` the spool is this process's until the block ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise SpoolLocked naming the directory and the holder's pid."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise SpoolLocked(
                f"spool directory {self.directory} is in use by another dicom-gateway process"
                + (f" (pid {holder})" if holder else "")
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # Only informative (the lock is the flock), so a full disk must not stop a start.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock. The file stays: unlinking it would let a process that opened
        the old file and one that creates a new one both think they hold the lock."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
