"""Where retrieved instances wait on disk, and the room they may take there.

An instance larger than ``retrieve.spill_mb`` (and a large conversion, the frames cut
from a whole instance, a bulk data value) waits in a file under the spool's
directory, so on the spool's disk, whose last ``spool.min_free_mb`` are kept for
C-STOREs. A C-MOVE of large instances towards a slow receiver fetches ahead of it and
could otherwise fill that disk: every modality's C-STORE would then be refused until
the move ended. So a retrieval reads ahead only while the disk keeps that floor: near
it, its readers wait (`room`) while spill files are held, which their senders delete
as they go. And a spill file grows only while the disk keeps the floor, checked
before it is opened and every CHECK_BYTES written; past it the write fails with
SpillFull, and that instance is not fetched (a failed sub-operation, a 503).
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

MiB = 1024 * 1024
CHECK_BYTES = 4 * MiB  # written between two looks at the free space
ROOM_POLL = 0.2  # seconds between two looks while a reader waits for room
# How long a reader's look at the free space holds, less what the area's writers
# wrote since (asking the file system costs more than the rest of a bulk read's step
# per instance).
LOOK_SECONDS = 0.05


class SpillFull(OSError):
    """Writing on would take the spool's disk below ``spool.min_free_mb``."""


class SpillArea:
    """The spill directory and the free space its disk must keep (``min_free``,
    bytes; changed by a reload of ``spool.min_free_mb``)."""

    def __init__(self, directory: Path, min_free: int = 0) -> None:
        self.directory = directory
        self.min_free = min_free
        self._seen = (0, -LOOK_SECONDS)  # (free bytes, when) of the last look
        self.claimed = 0  # bytes the area's writers were allowed since (`check`)

    def new_file(self, suffix: str) -> Path:
        """A fresh path in the area (nothing created there yet)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        return self.directory / f"{uuid.uuid4().hex}{suffix}"

    def near_floor(self) -> bool:
        """Whether a new spill file could not be opened: less than CHECK_BYTES above
        the floor, as seen at most LOOK_SECONDS ago less what writers were allowed
        since (readers only decide whether to wait by it; writers check exactly)."""
        free, when = self._seen
        free -= self.claimed
        now = time.monotonic()
        if now - when >= LOOK_SECONDS or free - CHECK_BYTES < self.min_free:
            free = self._look()
        return free - CHECK_BYTES < self.min_free

    def crowded(self) -> bool:
        """`near_floor` while spill files are held (their holders delete them once
        sent: room comes back)."""
        if not self.near_floor():
            return False
        with os.scandir(self.directory) as entries:
            return any(True for _ in entries)

    async def room(self, may_wait: Callable[[], bool] = lambda: True) -> bool:
        """Wait while the area is `crowded` and ``may_wait()`` (a reader whose turn has
        come must not wait for those queued behind it); returns whether it waited."""
        waited = False
        while may_wait() and self.crowded():
            waited = True
            await asyncio.sleep(ROOM_POLL)
        return waited

    def check(self, size: int = 0) -> None:
        """Raise SpillFull when ``size`` more bytes would take the disk below the
        floor; else they are the writer's to write (and counted as written)."""
        free = self._look()
        if free - size < self.min_free:
            raise SpillFull(
                errno.ENOSPC,
                f"not spilled to disk: the spool's disk has {free // MiB} MiB free, too close to the "
                f"{self.min_free // MiB} MiB kept for C-STOREs (spool.min_free_mb)",
            )
        self.claimed = size

    def _look(self) -> int:
        """The free space now, remembered for `near_floor`."""
        free = self._free()
        self._seen, self.claimed = (free, time.monotonic()), 0
        return free

    def _free(self) -> int:
        try:
            st = os.statvfs(self.directory)
        except FileNotFoundError:  # removed by hand while running
            self.directory.mkdir(parents=True, exist_ok=True)
            st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def writer(self, suffix: str) -> SpillWriter:
        """A new spill file, open for writing (the floor checked first)."""
        self.check(CHECK_BYTES)
        return SpillWriter(self, self.new_file(suffix))


class SpillWriter:
    """A spill file being written (``length`` bytes so far): room for each stretch of
    CHECK_BYTES (or one larger write) is checked before it starts; the file is deleted
    when a write fails (`discard`)."""

    def __init__(self, area: SpillArea, path: Path) -> None:
        self.area = area
        self.path = path
        self.fh: BinaryIO = open(path, "w+b")  # noqa: SIM115 - closed in close/discard
        self.length = 0
        self._allowed = CHECK_BYTES  # checked by `SpillArea.writer`

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if len(data) > self._allowed:
            stretch = max(CHECK_BYTES, len(data))
            self.area.check(stretch)
            self._allowed = stretch
        self._allowed -= len(data)
        self.fh.write(data)
        self.length += len(data)

    def truncate(self, length: int) -> None:
        """Cut the file back to ``length`` bytes and write on from there (a multipart
        reader wrote the start of a delimiter split across chunks)."""
        self.fh.truncate(length)
        self.fh.seek(length)
        self.length = length

    def close(self) -> Path:
        self.fh.close()
        return self.path

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> SpillWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self.discard()
