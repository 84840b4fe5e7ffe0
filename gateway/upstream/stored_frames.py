"""Frames cut out of a stored Part 10 file as they are stored (nothing converted).

The frames are produced one at a time and handed on in batches of about
`BATCH_BYTES`: asking every frame of a 500 MB native multi-frame instance held all of
them at once before (599 MiB resident for one request), now one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.encaps import get_frame

from gateway.codecs.errors import TranscodeError
from gateway.codecs.stream import native_frame_bits
from gateway.codecs.syntaxes import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_LE, IMPLICIT_VR_LE, syntax_info
from gateway.upstream.base import Frame
from gateway.upstream.errors import NotFound, UpstreamRejected

PIXEL_DATA = 0x7FE00010
# Values longer than this are left on disk when the file is parsed: a native Pixel
# Data is then read a frame at a time from its place.
DEFERRED = 1024
# Frames of these syntaxes are the same bytes: one may be served for the other.
NATIVE_LITTLE_ENDIAN = frozenset({IMPLICIT_VR_LE, EXPLICIT_VR_LE})
BATCH_BYTES = 8 << 20  # frames read per trip to a worker thread, at least one


def frame_reader(source: Path | bytes, stored: str, numbers: Sequence[int], acceptable: Sequence[str]) -> Iterator[Frame]:
    """The frames ``numbers`` of the Part 10 file at ``source`` (a path, or the file's
    bytes), one at a time (blocking; nothing is read before the first is asked).

    A native frame is read from its place in a file, so a large multi-frame instance is
    never read whole; a compressed one is taken from its fragments by pydicom. Raises
    NotFound, or UpstreamRejected (400: a frame past the instance's; 406: frames that
    cannot be cut out or served in an ``acceptable`` syntax).
    """
    try:
        if isinstance(source, Path):
            ds = pydicom.dcmread(source, defer_size=DEFERRED)
        else:
            ds = pydicom.dcmread(io.BytesIO(source))
    except FileNotFoundError:
        raise NotFound("instance not in the embedded archive") from None
    pixels = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if pixels is None:
        raise NotFound("the instance has no pixel data")
    count = int(ds.get("NumberOfFrames") or 1)
    past = [n for n in numbers if n > count]
    if past:
        raise UpstreamRejected(f"frame {past[0]} asked of an instance with {count}", 400)
    try:
        encapsulated = syntax_info(stored).encapsulated
    except TranscodeError as exc:
        raise UpstreamRejected(f"cannot cut frames out of this instance: {exc}", 406) from None
    native = EXPLICIT_VR_LE if stored == DEFLATED_EXPLICIT_VR_LE else stored
    served = _served_syntax(native, acceptable)
    if served is None:
        raise UpstreamRejected(f"the embedded archive holds the frames in {native} only", 406)
    if encapsulated:
        data = ds.PixelData
        extended = None
        if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
            extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
        for n in numbers:
            yield Frame(n, get_frame(data, n - 1, number_of_frames=count, extended_offsets=extended), served)
        return
    try:
        bits = native_frame_bits(ds)
    except TranscodeError as exc:
        raise UpstreamRejected(f"cannot cut frames out of this instance: {exc}", 406) from None
    deferred = isinstance(pixels, RawDataElement) and pixels.value is None and stored != DEFLATED_EXPLICIT_VR_LE
    if deferred and isinstance(source, Path) and isinstance(pixels, RawDataElement):
        with open(source, "rb") as fh:
            for n in numbers:
                yield Frame(n, _native_frame(fh, pixels.value_tell, n - 1, bits), served)
        return
    whole = ds.PixelData
    for n in numbers:
        yield Frame(n, _native_frame(whole, 0, n - 1, bits), served)


async def in_batches(make: Callable[[], Iterator[Frame]]) -> AsyncIterator[Frame]:
    """The frames of the reader ``make`` returns (called on a worker thread, as it may
    read files), read on worker threads `BATCH_BYTES` a trip and handed on one by one:
    memory holds a batch, whatever was asked, and a request for a few frames makes one
    trip."""
    frames: Iterator[Frame] | None = None

    def take() -> tuple[list[Frame], bool]:
        nonlocal frames
        if frames is None:
            frames = make()
        return _take(frames, BATCH_BYTES)

    try:
        finished = False
        while not finished:
            batch, finished = await asyncio.to_thread(take)
            for frame in batch:
                yield frame
    finally:
        # A batch still being read on its thread (the client left meanwhile) keeps the
        # reader busy; it is closed when that thread lets go of it.
        with contextlib.suppress(ValueError, AttributeError):
            frames.close()  # type: ignore[union-attr]


def _take(frames: Iterator[Frame], budget: int) -> tuple[list[Frame], bool]:
    """Frames from ``frames`` until ``budget`` bytes (at least one frame) or the end;
    and whether the end was reached."""
    batch: list[Frame] = []
    size = 0
    for frame in frames:
        batch.append(frame)
        size += len(frame.data)
        if size >= budget:
            return batch, False
    return batch, True


def _served_syntax(native: str, acceptable: Sequence[str]) -> str | None:
    """The syntax frames stored in ``native`` are served as, None if not acceptable."""
    for syntax in acceptable:
        if syntax in ("*", native):
            return native
        if native in NATIVE_LITTLE_ENDIAN and syntax in NATIVE_LITTLE_ENDIAN:
            return syntax
    return None


def _native_frame(source: Any, start: int, index: int, bits: int) -> bytes:
    """Frame ``index`` of native pixel data at ``start`` of ``source`` (an open file or
    bytes), ``bits`` bits a frame; 1-bit frames need not start on a byte boundary."""
    first_bit = index * bits
    offset, shift = divmod(first_bit, 8)
    size = (shift + bits + 7) // 8
    if isinstance(source, (bytes, bytearray, memoryview)):
        chunk = bytes(source[start + offset : start + offset + size])
    else:
        source.seek(start + offset)
        chunk = source.read(size)
    if len(chunk) < size:
        raise UpstreamRejected("the stored pixel data is shorter than its frames", 400)
    if shift == 0 and bits % 8 == 0:
        return chunk
    unpacked = np.unpackbits(np.frombuffer(chunk, dtype=np.uint8), bitorder="little")[shift : shift + bits]
    return np.packbits(unpacked, bitorder="little").tobytes()
