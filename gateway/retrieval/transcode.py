"""An instance converted to a transfer syntax its receiver takes, in bounded memory.

In a worker thread, to the best syntax the receiver accepted (lossless first, lossy
only if ``allow_lossy``): frame by frame where it can be (`gateway.codecs.stream`), so
a few frames are in memory whatever the instance's size, into a file under the spill
directory when the result is larger than the spill size. Each conversion first takes
its estimated peak memory from a budget shared by every retrieval (`ByteBudget`), so
the codec threads together stay within it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, BinaryIO

from pydicom import dcmread
from pydicom.filewriter import dcmwrite

from gateway.codecs import TranscodeError, choose_transfer_syntax, transcode
from gateway.codecs.stream import FRAMES_HELD, Header, frame_size, obstacle, read_header, transcode_stream
from gateway.metrics import Metrics
from gateway.part10 import META_HEAD, read_file_meta
from gateway.retrieval.source import DataSource, Fetched, FileSlice
from gateway.spill import SpillArea
from gateway.upstream.base import Retrieved


class ByteBudget:
    """Memory the transcodes of every retrieval may hold at once, in bytes.

    A transcode takes its estimated peak first and waits, in order of asking, until it
    fits beside what the running ones hold; one larger than the whole budget waits to
    run alone. So the codec threads never hold several large instances decoded at once.
    Used from the event loop only.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> int:
        """Wait until ``size`` bytes fit; returns the amount held, to `release` later."""
        size = min(max(size, 0), self.capacity)
        if not self._waiting and self.held + size <= self.capacity:
            self.held += size
            return size
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].cancelled():  # still waiting: give up the place
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._grant()
            else:  # granted just as the cancellation came
                self.release(size)
            raise
        return size

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.capacity:
            size, waiter = self._waiting.popleft()
            if not waiter.cancelled():
                self.held += size
                waiter.set_result(None)


@dataclass
class Conversion:
    """How one instance is converted for its receiver, decided from its header."""

    target: str
    header: Header | None  # None: converted whole (`gateway.codecs.stream` says when)
    holds: int  # estimated peak memory of the conversion, in bytes
    output: int  # estimated size of the converted data set, in bytes


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a seekable file, as a file of their own: the
    Part 10 file inside a retrieved answer (which may hold more, e.g. multipart)."""

    name = "<retrieved instance>"  # pydicom asks file objects for one

    def __init__(self, raw: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._raw, self._start, self._length, self._pos = raw, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        size = max(min(len(buffer), self._length - self._pos), 0)
        if size == 0:
            return 0
        self._raw.seek(self._start + self._pos)
        count = self._raw.readinto(memoryview(buffer)[:size])  # type: ignore[attr-defined]
        self._pos += count
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def part10_file(retrieved: Retrieved) -> Iterator[BinaryIO]:
    """The retrieved Part 10 file, readable and seekable (blocking for files)."""
    raw: IO[bytes] = BytesIO(retrieved.data) if retrieved.data is not None else open(retrieved.path, "rb")  # type: ignore[arg-type]
    with io.BufferedReader(_Window(raw, retrieved.offset, retrieved.length), 1 << 16) as fp:  # type: ignore[arg-type]
        yield fp  # type: ignore[misc]


def _drop_output(future: asyncio.Future[tuple[DataSource, Path | None]]) -> None:
    """Delete the spill file of a conversion nobody waits for any more."""
    if not future.cancelled() and future.exception() is None and future.result()[1] is not None:
        future.result()[1].unlink(missing_ok=True)  # type: ignore[union-attr]


class Transcoder:
    """Converts fetched instances on ``executor``'s threads, within ``budget``.

    Outputs larger than ``spill_bytes`` go to files under ``spill_area``, which the
    caller deletes once sent.
    """

    def __init__(
        self, executor: Executor, budget: ByteBudget, allow_lossy: bool, spill_area: SpillArea, spill_bytes: int,
        metrics: Metrics | None = None,
    ) -> None:
        """``metrics``: where each conversion is counted by its syntax pair."""
        self.metrics = metrics
        self.executor = executor
        self.budget = budget
        self.allow_lossy = allow_lossy
        self.spill_area = spill_area
        self.spill_bytes = spill_bytes

    def _plan(self, item: Fetched, accepted: list[str], preferred: Sequence[str]) -> Conversion:
        """Read the instance's header and decide how to convert it (worker thread)."""
        r = item.retrieved
        assert r is not None
        with part10_file(r) as fp:
            header = read_header(fp)
        desc = header.description()
        target = choose_transfer_syntax(
            header.source, accepted, self.allow_lossy, has_pixel_data=header.has_pixel_data, desc=desc, preferred=preferred
        )
        if target is None:
            raise TranscodeError(f"no accepted transfer syntax can carry this {item.transfer_syntax} instance")
        decoded = header.decoded_size()
        if desc is not None and obstacle(header, target) is None:
            return Conversion(str(target), header, FRAMES_HELD * frame_size(desc), r.length + decoded)
        # Whole: the stored bytes and their parse, the decoded frames, the new pixel
        # data, the written data set and its copy.
        return Conversion(str(target), None, 2 * r.length + 4 * decoded, r.length + decoded)

    def _whole(self, item: Fetched, target: str) -> memoryview:
        """The data set converted by the whole-instance `transcode` (worker thread)."""
        assert item.retrieved is not None
        ds = dcmread(BytesIO(item.retrieved.read()), force=True)
        out = transcode(ds, target, allow_lossy=self.allow_lossy)
        del ds
        buffer = BytesIO()
        dcmwrite(buffer, out, enforce_file_format=True)
        encoded = buffer.getbuffer()
        return encoded[read_file_meta(bytes(encoded[:META_HEAD])).dataset_offset :]

    def _convert(self, item: Fetched, conversion: Conversion) -> tuple[DataSource, Path | None]:
        """The converted data set, in memory or in a spill file (returned to delete after
        sending) when larger than ``spill_bytes`` (worker thread)."""
        assert item.retrieved is not None
        path = None
        if conversion.output > self.spill_bytes:
            self.spill_area.check(conversion.output)
            path = self.spill_area.new_file(".converted")
        try:
            with open(path, "w+b") if path is not None else BytesIO() as out:
                if conversion.header is not None:
                    with part10_file(item.retrieved) as fp:
                        transcode_stream(fp, conversion.header, conversion.target, out)
                else:
                    out.write(self._whole(item, conversion.target))
                if path is None:
                    return out.getvalue(), None  # type: ignore[union-attr]
                size = out.seek(0, io.SEEK_END)
            return FileSlice(path, 0, size), path
        except BaseException:
            if path is not None:
                path.unlink(missing_ok=True)
            raise

    async def for_receiver(
        self, item: Fetched, accepted: list[str], preferred: Sequence[str] = ()
    ) -> tuple[str, DataSource, Path | None]:
        """What to send a receiver that accepted ``accepted`` for the instance's class:
        as stored when that is accepted and not passed over for one of the receiver's
        ``preferred`` syntaxes it accepted, else converted (`transcoded`)."""
        wanted = [ts for ts in preferred if ts in accepted]
        if item.transfer_syntax in accepted and (not wanted or item.transfer_syntax in wanted):
            return item.transfer_syntax, item.dataset(), None
        return await self.transcoded(item, accepted, wanted)

    async def transcoded(
        self, item: Fetched, accepted: list[str], preferred: Sequence[str] = ()
    ) -> tuple[str, DataSource, Path | None]:
        """(syntax, data set, spill file to delete after sending or None) of the instance
        converted for the receiver (to the first of ``preferred`` it accepted and that
        can carry it, if any), within the memory budget.

        The worker thread cannot be interrupted: when the request is cancelled meanwhile,
        its budget stays taken until it ends and its output is then deleted.
        """
        loop = asyncio.get_running_loop()
        conversion = await loop.run_in_executor(self.executor, self._plan, item, accepted, preferred)
        if conversion.target == item.transfer_syntax:
            return conversion.target, item.dataset(), None  # no preferred syntax can carry it: as stored
        held = await self.budget.acquire(conversion.holds)
        future = loop.run_in_executor(self.executor, self._convert, item, conversion)
        future.add_done_callback(lambda _: self.budget.release(held))
        try:
            dataset, spilled = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_drop_output)
            raise
        if self.metrics is not None:
            self.metrics.transcodes.labels(item.transfer_syntax, conversion.target).inc()
        return conversion.target, dataset, spilled
