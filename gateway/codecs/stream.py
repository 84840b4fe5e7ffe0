"""Frame-by-frame transfer syntax conversion of a Part 10 file, in bounded memory.

`transcode` (convert.py) works on a parsed Dataset: the stored pixel data, every
decoded frame, the re-encoded pixel data and the written result are all in memory at
once, several times the decoded size of the instance (2 GiB of peak memory for a
500 MiB multi-frame). Here the data set is parsed only up to its Pixel Data; then
one frame at a time is read from the file, decoded, re-encoded and written to the
output before the next is read, so a few frames are in memory whatever the size.
The result is the same data set `transcode` gives (same attributes rewritten, a Basic
Offset Table in encapsulated output), except that Data Set Trailing Padding is
dropped.

`obstacle` says when this cannot be done and the whole-instance `transcode` must be
used instead:

- no Pixel Data (7FE0,0010) at the top level, or Float/Double Float Pixel Data:
  nothing to take frame by frame (and such instances are small);
- Deflated Explicit VR Little Endian, source or target: the whole data set is one
  deflate stream, so Pixel Data cannot be reached without inflating what precedes it
  (nor written without deflating it all);
- Explicit VR Big Endian, source or target: the elements before the pixel data are
  byte-swapped one by one on a parsed data set (`convert._renative`);
- 1-bit pixel data: native frames are bit-packed across frame boundaries;
- a lossy target: its compression ratio is recorded in the Image Pixel attributes,
  which are written before the pixel data that decides it.

Like the rest of the package this module opens no files: the caller hands in a
readable, seekable Part 10 file positioned at its start (and bounded to it) and a
writable, seekable output.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

from gateway.codecs.convert import _update_image_pixel
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frames import decode_frame_described, encode_frame, encoded_description, native_bytes
from gateway.codecs.syntaxes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    IMPLICIT_VR_LE,
    Fidelity,
    rgb_on_decode,
    source_syntax,
    syntax_info,
)

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
TRAILING_PADDING = 0xFFFCFFFC
ITEM = 0xFFFEE000
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# Basic Offset Table entries are 32-bit: output whose frames could start past this
# gets an empty table (allowed, PS3.5 A.4) rather than offsets that would wrap.
_MAX_BOT_OFFSET = 2**32 - 1
# Native pixel data is copied through in pieces of this size when only the element
# header changes (between Explicit and Implicit VR Little Endian).
_COPY_CHUNK = 4 << 20
# Frames in memory at once: the stored one, its decoded array, its re-encoding, and
# the pydicom copy the decoder makes.
FRAMES_HELD = 4
_NOT_STREAMED = (DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE)


@dataclass
class Header:
    """A Part 10 file read up to its pixel data."""

    dataset: Dataset  # every top-level element before the pixel data, File Meta included
    source: UID
    pixel_tag: int | None  # the pixel data element where reading stopped; None: none
    pixel_position: int  # where that element starts in the file (-1: not known, Deflated)

    @property
    def frames(self) -> int:
        """Number of Frames (1 when absent); TranscodeError when not a number."""
        try:
            return int(self.dataset.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            raise TranscodeError("invalid Number of Frames") from None

    @property
    def has_pixel_data(self) -> bool:
        """Whether it has Pixel Data (7FE0,0010), the only kind that can be compressed."""
        return self.pixel_tag == PIXEL_DATA

    def description(self) -> PixelDescription | None:
        """The stored pixel data's description, None without Pixel Data.

        Raises TranscodeError when the Image Pixel module is incomplete."""
        return PixelDescription.from_dataset(self.dataset) if self.has_pixel_data else None

    def decoded_size(self) -> int:
        """Bytes of all frames decoded: what a whole-instance conversion holds, times a
        few. An estimate: an invalid Number of Frames counts as 1 here (converting
        between native syntaxes never needs it)."""
        desc = self.description()
        if desc is None:
            return 0
        try:
            frames = self.frames
        except TranscodeError:
            frames = 1
        return frames * frame_size(desc)


def native_frame_bits(ds: Dataset) -> int:
    """Bits of one native frame of ``ds``: Rows x Columns x Samples per Pixel x Bits
    Allocated, two thirds of that in YBR_FULL_422 (chrominance halved horizontally,
    PS3.3 C.7.6.3.1.2). Raises TranscodeError when the Image Pixel module is incomplete."""
    try:
        bits = int(ds.Rows) * int(ds.Columns) * int(ds.SamplesPerPixel) * int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        raise TranscodeError("incomplete Image Pixel module") from None
    return bits // 3 * 2 if ds.get("PhotometricInterpretation") == "YBR_FULL_422" else bits


def frame_size(desc: PixelDescription) -> int:
    """Bytes of one native frame described by ``desc`` (whole bytes per sample; two
    samples per pixel in YBR_FULL_422, whose chrominance is halved horizontally)."""
    size = desc.rows * desc.columns * desc.samples_per_pixel * max(desc.bits_allocated // 8, 1)
    return size // 3 * 2 if desc.photometric_interpretation == "YBR_FULL_422" else size


def read_header(fp: BinaryIO) -> Header:
    """Parse ``fp`` up to its top-level pixel data; leaves ``fp`` anywhere.

    A Deflated data set is read whole instead: pydicom inflates it into a buffer of
    its own, so where its pixel data starts cannot be known here (it is converted
    whole anyway, and such instances are rare and small).
    """
    start = fp.tell()
    try:
        ds = dcmread(fp, stop_before_pixels=True, force=True)
        source = source_syntax(ds)
        if source == DEFLATED_EXPLICIT_VR_LE:
            fp.seek(start)
            ds = dcmread(fp, force=True)
            found = [tag for tag in (PIXEL_DATA, *FLOAT_PIXEL_DATA) if tag in ds]
            return Header(ds, source, found[0] if found else None, -1)
    except TranscodeError:
        raise
    except Exception as exc:  # pydicom raises assorted types on malformed input
        raise TranscodeError(f"unreadable data set: {type(exc).__name__}: {exc}") from exc
    position = fp.tell()
    tag_bytes = fp.read(4)
    pixel_tag = None
    if len(tag_bytes) == 4:
        group, element = struct.unpack(">HH" if source == EXPLICIT_VR_BE else "<HH", tag_bytes)
        tag = group << 16 | element
        if tag == PIXEL_DATA or tag in FLOAT_PIXEL_DATA:
            pixel_tag = tag
    return Header(ds, source, pixel_tag, position)


def obstacle(header: Header, target: str) -> str | None:
    """Why ``header``'s instance cannot be converted to ``target`` frame by frame
    (then the whole-instance `transcode` is used), or None when it can."""
    target_info = syntax_info(target)
    if not header.has_pixel_data:
        return "no Pixel Data to take frame by frame"
    if header.source in _NOT_STREAMED or target_info.uid in _NOT_STREAMED:
        return "deflated or big endian data sets are converted whole"
    desc = header.description()
    assert desc is not None
    if desc.bits_allocated == 1:
        return "1-bit frames are not byte aligned"
    if not target_info.encode_lossless:
        return "a lossy target's compression ratio precedes the pixel data"
    return None


def transcode_stream(fp: BinaryIO, header: Header, target: str, out: BinaryIO) -> None:
    """Write ``header``'s instance re-encoded in ``target`` to ``out``: the data set
    only, no preamble nor File Meta (as a C-STORE carries it).

    ``header`` comes from `read_header` on ``fp`` (its data set is rewritten on the
    way), and `obstacle` found none. Raises TranscodeError when the pixel data cannot
    be decoded or encoded, or holds fewer frames than it says.
    """
    target_info = syntax_info(target)
    source = syntax_info(header.source)
    ds = header.dataset
    vr, length, value_start = _pixel_element(fp, header.pixel_position)
    if source.encapsulated != (length == UNDEFINED_LENGTH):
        raise TranscodeError(f"{source.name} Pixel Data with {'un' if length == UNDEFINED_LENGTH else ''}defined length")
    value_end = _end_of_items(fp, value_start) if source.encapsulated else value_start + length
    tail = _tail(fp, value_end, ds, implicit=not vr)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    ds.file_meta.TransferSyntaxUID = target_info.uid
    writer = DicomFileLike(out)
    writer.is_little_endian, writer.is_implicit_VR = True, target_info.uid == IMPLICIT_VR_LE
    if source.native and target_info.native:
        # Only the element header changes: the bytes go through untouched, and the
        # frames are not even counted (as in `transcode`).
        write_dataset(writer, ds)
        bits = int(ds.get("BitsAllocated") or 16)
        _element_header(out, writer.is_implicit_VR, vr if vr in (b"OB", b"OW") else (b"OB" if bits <= 8 else b"OW"), length)
        fp.seek(value_start)
        _copy(fp, out, length)
    else:
        _recode(fp, header, value_start, length, target_info.uid, out, writer)
    if tail is not None:
        write_dataset(writer, tail, parent_encoding=_charset(ds))


def frames_as_stored(fp: BinaryIO) -> tuple[UID, Iterator[bytes]]:
    """The syntax ``fp``'s frames are stored in, and the frames, one at a time as they
    are read (a frame in memory whatever the instance's size).

    Native frames are `native_frame_bits` long, as the embedded archive cuts them. Raises TranscodeError where the frames cannot
    be reached one by one (Deflated or big-endian data sets, 1-bit native frames packed
    across byte boundaries) or there are none.
    """
    header = read_header(fp)
    if header.source in _NOT_STREAMED:
        raise TranscodeError(f"frames of {header.source} are not read one by one")
    if not header.has_pixel_data:
        raise TranscodeError("no Pixel Data")
    source = syntax_info(header.source)
    count = header.frames
    vr, length, value_start = _pixel_element(fp, header.pixel_position)
    if source.encapsulated != (length == UNDEFINED_LENGTH):
        raise TranscodeError(f"{source.name} Pixel Data with {'un' if length == UNDEFINED_LENGTH else ''}defined length")
    if source.encapsulated:
        return source.uid, _encapsulated_frames(fp, value_start, header.dataset, count)
    bits = native_frame_bits(header.dataset)
    if bits % 8:
        raise TranscodeError("native frames that do not end on a byte boundary")
    if length < count * (bits // 8):
        raise TranscodeError(f"Pixel Data holds {length} bytes, {count} frames need {count * (bits // 8)}")
    return source.uid, _native_frames(fp, value_start, bits // 8, count)


def fragment_spans(fp: BinaryIO) -> tuple[UID, list[tuple[int, int]]]:
    """The syntax ``fp``'s Pixel Data is stored in and, when it is encapsulated, where
    each of its fragments' values lies in the file, (offset, length) in order, the
    Basic Offset Table left out (an empty list for native pixel data). A video's
    stream is its fragments' values joined (PS3.5 A.4), which a client can then be
    sent any byte range of without the file being read whole. Raises TranscodeError
    when the pixel data cannot be walked (none, Deflated or big-endian data sets,
    a broken item)."""
    header = read_header(fp)
    if header.source in _NOT_STREAMED:
        raise TranscodeError(f"the pixel data of {header.source} is not read in place")
    if not header.has_pixel_data:
        raise TranscodeError("no Pixel Data")
    _, length, position = _pixel_element(fp, header.pixel_position)
    if length != UNDEFINED_LENGTH:
        return header.source, []
    items = list(_items(fp, position))
    return header.source, [span for span in items[1:] if span[1] >= 0]


def _pixel_element(fp: BinaryIO, position: int) -> tuple[bytes, int, int]:
    """(VR, or b"" when implicit; value length; where the value starts) of the Pixel
    Data element at ``position``.

    Explicit or implicit VR as the element itself says, as pydicom reads it: some
    archives hold implicit VR data sets under an explicit transfer syntax. (An
    implicit length spelling OB, OW or UN would be odd, which pixel data never is.)
    """
    fp.seek(position + 4)
    head = fp.read(8)
    if len(head) != 8:
        raise TranscodeError("Pixel Data ends early")
    if head[:2] in (b"OB", b"OW", b"UN") and head[2:4] == b"\0\0":
        return head[:2], struct.unpack_from("<I", head, 4)[0], position + 12
    return b"", struct.unpack_from("<I", head)[0], position + 8


def _recode(
    fp: BinaryIO, header: Header, value_start: int, length: int, target: UID, out: BinaryIO, writer: DicomFileLike
) -> None:
    """Decode the stored frames one at a time and write them re-encoded, after the
    data set with the Image Pixel attributes the first decoded frame sets."""
    source = syntax_info(header.source)
    target_info = syntax_info(target)
    stored = header.description()
    assert stored is not None
    count = header.frames
    ds = header.dataset
    if source.encapsulated:
        stored_frames = _encapsulated_frames(fp, value_start, ds, count)
    else:
        if length < count * frame_size(stored):
            raise TranscodeError(f"Pixel Data holds {length} bytes, {count} frames need {count * frame_size(stored)}")
        stored_frames = _native_frames(fp, value_start, frame_size(stored), count)
    as_rgb = rgb_on_decode(source.uid)
    frames = (decode_frame_described(data, source.uid, stored, as_rgb=as_rgb) for data in stored_frames)
    first = next(frames, None)
    if first is None:
        raise TranscodeError("the Pixel Data holds no frames")
    decoded = first[1]
    _update_image_pixel(ds, decoded if target_info.native else encoded_description(target, decoded), count)
    if source.fidelity is Fidelity.LOSSY and "LossyImageCompression" not in ds:
        ds.LossyImageCompression = "01"  # the values were lossy-compressed once
    write_dataset(writer, ds)
    arrays = itertools.chain([first], frames)
    if target_info.native:
        _write_native(out, writer.is_implicit_VR, arrays, decoded, count)
    else:
        _write_encapsulated(out, writer.is_implicit_VR, arrays, target, decoded, count)


def _charset(ds: Dataset) -> list[str]:
    """The Python codecs of the data set's Specific Character Set (for the elements
    after the pixel data, read and written apart from it)."""
    return convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")


def _items(fp: BinaryIO, start: int) -> Iterator[tuple[int, int]]:
    """(where its value starts, its length) of each item of the encapsulated pixel data
    starting at ``start``, the Basic Offset Table first; then, after the sequence
    delimiter, (where the pixel data ends, -1)."""
    position = start
    while True:
        fp.seek(position)
        head = fp.read(8)
        if len(head) != 8:
            raise TranscodeError("encapsulated Pixel Data without its sequence delimiter")
        group, element, length = struct.unpack("<HHI", head)
        tag = group << 16 | element
        if tag == SEQUENCE_DELIMITER:
            yield position + 8, -1
            return
        if tag != ITEM or length == UNDEFINED_LENGTH:
            raise TranscodeError(f"unexpected tag ({group:04X},{element:04X}) in encapsulated Pixel Data")
        yield position + 8, length
        position += 8 + length


def _end_of_items(fp: BinaryIO, start: int) -> int:
    """Where encapsulated pixel data starting at ``start`` ends (after its delimiter)."""
    return next(position for position, length in _items(fp, start) if length < 0)


def _encapsulated_frames(fp: BinaryIO, start: int, ds: Dataset, count: int) -> Iterator[bytes]:
    """The stored frames, one at a time (fragments of a frame joined)."""
    fp.seek(start)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        yield from itertools.islice(generate_frames(fp, number_of_frames=count, extended_offsets=extended), count)
    except (ValueError, struct.error) as exc:
        raise TranscodeError(f"cannot find the frames of the encapsulated Pixel Data: {exc}") from exc


def _native_frames(fp: BinaryIO, start: int, size: int, count: int) -> Iterator[bytes]:
    fp.seek(start)
    for _ in range(count):
        data = fp.read(size)
        if len(data) != size:
            raise TranscodeError("native Pixel Data ends before its last frame")
        yield data


def _tail(fp: BinaryIO, start: int, ds: Dataset, implicit: bool) -> Dataset | None:
    """Top-level elements after the pixel data, without Data Set Trailing Padding."""
    fp.seek(start)
    if not fp.read(1):
        return None
    fp.seek(start)
    try:
        tail = read_dataset(fp, implicit, True, stop_when=lambda tag, vr, length: tag == TRAILING_PADDING, parent_encoding=_charset(ds))
    except Exception as exc:  # pydicom raises assorted types on malformed input
        raise TranscodeError(f"unreadable elements after the Pixel Data: {type(exc).__name__}: {exc}") from exc
    return tail if len(tail) else None


def _element_header(out: BinaryIO, implicit: bool, vr: bytes, length: int) -> None:
    if implicit:
        out.write(struct.pack("<HHI", 0x7FE0, 0x0010, length))
    else:
        out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, length))


def _copy(fp: BinaryIO, out: BinaryIO, length: int) -> None:
    remaining = length
    while remaining:
        chunk = fp.read(min(_COPY_CHUNK, remaining))
        if not chunk:
            raise TranscodeError("Pixel Data ends early")
        out.write(chunk)
        remaining -= len(chunk)


def _write_native(
    out: BinaryIO, implicit: bool, arrays: Iterator[tuple], desc: PixelDescription, count: int
) -> None:
    """Native Pixel Data of ``count`` frames; its length is known before the first."""
    length = count * frame_size(desc)
    _element_header(out, implicit, b"OB" if desc.bits_allocated <= 8 else b"OW", length + length % 2)
    written = 0
    for arr, frame_desc in arrays:
        if frame_desc != desc:
            raise TranscodeError("frames of the Pixel Data decode differently")
        out.write(native_bytes(arr, desc, little_endian=True))
        written += 1
    if written != count:
        raise TranscodeError(f"the Pixel Data holds {written} frames, Number of Frames says {count}")
    if length % 2:
        out.write(b"\x00")


def _write_encapsulated(
    out: BinaryIO, implicit: bool, arrays: Iterator[tuple], target: UID, desc: PixelDescription, count: int
) -> None:
    """Encapsulated Pixel Data, one fragment per frame, with a Basic Offset Table
    reserved before the first frame and filled in after the last."""
    _element_header(out, implicit, b"OB", UNDEFINED_LENGTH)
    # Lossless output stays near the decoded size; where offsets might not fit, no table.
    with_table = count * (frame_size(desc) + 1024) <= _MAX_BOT_OFFSET * 3 // 4
    table_at = out.tell()
    out.write(struct.pack("<HHI", 0xFFFE, 0xE000, 4 * count if with_table else 0))
    if with_table:
        out.write(bytes(4 * count))
    offsets: list[int] = []
    position = 0
    for arr, frame_desc in arrays:
        if frame_desc != desc:
            raise TranscodeError("frames of the Pixel Data decode differently")
        data = encode_frame(arr, target, desc)
        padded = len(data) + len(data) % 2
        offsets.append(position)
        out.write(struct.pack("<HHI", 0xFFFE, 0xE000, padded))
        out.write(data)
        if len(data) % 2:
            out.write(b"\x00")
        position += 8 + padded
    if len(offsets) != count:
        raise TranscodeError(f"the Pixel Data holds {len(offsets)} frames, Number of Frames says {count}")
    out.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    if with_table:
        if offsets[-1] > _MAX_BOT_OFFSET:
            raise TranscodeError("encoded frames too large for a Basic Offset Table")
        end = out.tell()
        out.seek(table_at + 8)
        out.write(struct.pack(f"<{count}I", *offsets))
        out.seek(end)
