"""One fetched instance, and the data set bytes that go to a receiver.

A `Fetched` instance is a Part 10 file (in memory, or in a file when large) whose File
Meta has been read with `gateway.part10` only, never the data set: an instance sent as
stored goes out without being parsed. Its data set is handed to the receiver as a
`DataSource`: bytes, or a `FileSlice` the receiver reads in bounded chunks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from gateway.part10 import META_HEAD, FileMeta, read_file_meta
from gateway.retrieval.request import InstanceRef
from gateway.upstream.base import Retrieved


@dataclass(frozen=True)
class FileSlice:
    """A data set held in a file: ``length`` bytes from ``offset``."""

    path: Path
    offset: int
    length: int


DataSource = bytes | memoryview | FileSlice


@dataclass
class Fetched:
    """One instance after its fetch: where its Part 10 file is and what its meta says."""

    ref: InstanceRef
    retrieved: Retrieved | None = None
    transfer_syntax: str = ""
    sop_class_uid: str = ""
    dataset_offset: int = 0  # where the data set starts, within the Part 10 file
    error: str = ""

    def dataset(self) -> DataSource:
        """The data set bytes as stored, without preamble and File Meta."""
        r = self.retrieved
        assert r is not None
        if r.data is not None:
            return memoryview(r.data)[r.offset + self.dataset_offset : r.offset + r.length]
        assert r.path is not None
        return FileSlice(r.path, r.offset + self.dataset_offset, r.length - self.dataset_offset)

    def release(self) -> None:
        if self.retrieved is not None:
            self.retrieved.release()
            self.retrieved = None


async def inspect(retrieved: Retrieved) -> FileMeta:
    """The File Meta of a retrieved instance (a spilled one read in a worker thread);
    raises ValueError when it is not a Part 10 file, OSError when its file is gone."""
    if retrieved.head is not None:
        head = retrieved.head
    elif retrieved.data is not None:
        head = retrieved.read(0, META_HEAD)
    else:
        head = await asyncio.get_running_loop().run_in_executor(None, retrieved.read, 0, META_HEAD)
    return read_file_meta(head)
