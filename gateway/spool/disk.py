"""The file operations of the spool's write path, behind one object.

Production uses the operating system's calls as they are. The power-cut test puts a
recorder in their place that knows which bytes a sync made durable, so it can build
every disk state a power cut could leave and check that recovery finds each
acknowledged instance whole.
"""

from __future__ import annotations

import os
from pathlib import Path


class Disk:
    """``create``/``open``/``pwrite``/syncs/``close``/``unlink`` on spool files."""

    def create(self, path: Path) -> int:
        """A new file that did not exist (its directory entry is durable only after
        `fsync_dir` of its parent)."""
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)

    def open(self, path: Path) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def fdatasync(self, fd: int) -> None:
        """The bytes written and the file's size: what a record needs to be durable."""
        os.fdatasync(fd)

    def fsync_dir(self, path: Path) -> None:
        """Make the entries of directory ``path`` (files created or removed) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def unlink(self, path: Path) -> None:
        path.unlink(missing_ok=True)
