"""File-system durability helpers."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file, or a directory so that a rename or link inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_buckets(directory: Path) -> None:
    """Create ``directory`` and its subdirectories ``00`` to ``ff``, durably.

    Done once at start-up so that storing a file never creates a directory: otherwise
    a thread could rename a file into a subdirectory another thread has just created,
    fsync only that subdirectory and acknowledge, while the subdirectory's own entry
    in ``directory`` is not durable yet. Fsyncs ``directory`` and its parent.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(256):
        (directory / f"{n:02x}").mkdir(exist_ok=True)
    fsync_path(directory, directory=True)
    fsync_path(directory.parent, directory=True)
