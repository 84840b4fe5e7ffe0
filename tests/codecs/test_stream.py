"""transcode_stream(): the frame-by-frame conversion gives what transcode() gives."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from gateway.codecs import TranscodeError, transcode
from gateway.codecs.stream import frames_as_stored, obstacle, read_header, transcode_stream
from gateway.codecs.syntaxes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K_LOSSLESS,
    IMPLICIT_VR_LE,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    RLE_LOSSLESS,
)
from gateway.part10 import read_file_meta
from gateway.upstream.base import ANY_SYNTAX
from gateway.upstream.stored_frames import frame_reader
from tests.codecs.helpers import bundled, gradient_frames, make_dataset

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # rtdose fixtures

TARGETS = [EXPLICIT_VR_LE, IMPLICIT_VR_LE, JPEG2000_LOSSLESS, RLE_LOSSLESS, HTJ2K_LOSSLESS]
BUNDLED = [
    "CT_small.dcm",  # native, trailing padding
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_rle_2frame.dcm",  # multi-frame colour
    "rtdose_rle.dcm",  # multi-frame 32-bit
    "SC_rgb_jpeg_dcmd.dcm",  # lossy source, implicit VR under a JPEG syntax
    "SC_ybr_full_422_uncompressed.dcm",  # subsampled native frames
    "JPEG2000.dcm",
]


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def streamed(raw: bytes, target: UID) -> bytes:
    header = read_header(io.BytesIO(raw))
    assert obstacle(header, target) is None
    out = io.BytesIO()
    transcode_stream(io.BytesIO(raw), header, target, out)
    return out.getvalue()


def whole(raw: bytes, target: UID) -> bytes:
    encoded = part10(transcode(dcmread(io.BytesIO(raw), force=True), target))
    return encoded[read_file_meta(encoded[:65536])[3] :]


def elements(data: bytes, target: UID) -> dict[int, object]:
    ds = read_dataset(io.BytesIO(data), target == IMPLICIT_VR_LE, True)
    return {int(e.tag): e.value for e in ds if e.keyword != "DataSetTrailingPadding"}


@pytest.mark.parametrize("target", TARGETS, ids=lambda uid: UID(uid).name)
@pytest.mark.parametrize("name", BUNDLED)
def test_streamed_data_set_is_what_transcode_gives(name: str, target: UID) -> None:
    """Every element and every pixel byte as the whole-instance conversion writes them
    (Data Set Trailing Padding aside, which the stream drops)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    raw = open(path, "rb").read()
    header = read_header(io.BytesIO(raw))
    if header.source == target:
        pytest.skip("stored in the target syntax: never converted")
    if obstacle(header, target):
        pytest.skip(f"converted whole: {obstacle(header, target)}")
    try:
        expected = whole(raw, target)
    except TranscodeError as exc:
        with pytest.raises(TranscodeError):
            streamed(raw, target)
        pytest.skip(f"not convertible: {exc}")
    assert elements(streamed(raw, target), target) == elements(expected, target)


def test_multi_frame_output_has_a_filled_basic_offset_table() -> None:
    frames = gradient_frames(5, 64, 48, "uint16")
    raw = part10(make_dataset(frames, photometric="MONOCHROME2"))
    out = streamed(raw, RLE_LOSSLESS)
    ds = read_dataset(io.BytesIO(out), False, True)
    converted = Dataset(ds)
    converted.file_meta = dcmread(io.BytesIO(raw)).file_meta
    converted.file_meta.TransferSyntaxUID = RLE_LOSSLESS
    assert np.array_equal(converted.pixel_array, frames)
    value = ds.PixelData
    (count,) = struct.unpack_from("<4xI", value)
    offsets = struct.unpack_from(f"<{count // 4}I", value, 8)
    assert len(offsets) == 5 and offsets[0] == 0
    first_item = 8 + count
    for offset in offsets:
        assert value[first_item + offset : first_item + offset + 4] == b"\xfe\xff\x00\xe0"


def test_elements_after_the_pixel_data_survive_and_padding_goes() -> None:
    frames = gradient_frames(2, 16, 16, "uint8")
    ds = make_dataset(frames, photometric="MONOCHROME2")
    ds.add_new(0x7FE10010, "LO", "PRIVATE CREATOR")
    ds.add_new(0x7FE11001, "LO", "after the pixels")
    ds.add_new(0xFFFCFFFC, "OB", b"\x00" * 64)
    out = streamed(part10(ds), RLE_LOSSLESS)
    got = read_dataset(io.BytesIO(out), False, True)
    assert got[0x7FE11001].value == "after the pixels"
    assert 0xFFFCFFFC not in got
    assert int(got.NumberOfFrames) == 2


def test_fewer_frames_than_announced_is_an_error() -> None:
    ds = make_dataset(gradient_frames(3, 16, 16, "uint16"), photometric="MONOCHROME2")
    ds.NumberOfFrames = 4
    with pytest.raises(TranscodeError, match="frames need"):
        streamed(part10(ds), RLE_LOSSLESS)


@pytest.mark.parametrize(
    ("source", "target", "reason"),
    [
        (EXPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, "deflated"),
        (EXPLICIT_VR_LE, EXPLICIT_VR_BE, "big endian"),
        (EXPLICIT_VR_BE, EXPLICIT_VR_LE, "big endian"),
        (EXPLICIT_VR_LE, JPEG_BASELINE, "lossy"),
    ],
)
def test_what_goes_whole(source: UID, target: UID, reason: str) -> None:
    ds = make_dataset(gradient_frames(1, 16, 16, "uint8"), photometric="MONOCHROME2", transfer_syntax=source)
    assert reason in (obstacle(read_header(io.BytesIO(part10(ds))), target) or "")


def test_one_bit_and_no_pixel_data_go_whole() -> None:
    ds = make_dataset(gradient_frames(1, 16, 16, "uint8"), photometric="MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = b"\x00" * 32
    assert "1-bit" in (obstacle(read_header(io.BytesIO(part10(ds))), IMPLICIT_VR_LE) or "")
    del ds.PixelData
    header = read_header(io.BytesIO(part10(ds)))
    assert not header.has_pixel_data and "no Pixel Data" in (obstacle(header, IMPLICIT_VR_LE) or "")


@pytest.mark.parametrize("name", BUNDLED)
def test_frames_as_stored_are_the_frames_the_embedded_archive_cuts(name: str) -> None:
    """Read one at a time from the file, the frames equal what `frame_reader` cuts from
    the parsed instance (the embedded archive's frames route), in the stored syntax."""
    raw = part10(bundled(name))
    syntax, frames = frames_as_stored(io.BytesIO(raw))
    got = list(frames)
    stored = read_file_meta(raw).transfer_syntax
    expected = list(frame_reader(raw, stored, range(1, len(got) + 1), ANY_SYNTAX))
    assert syntax == stored and len(got) == int(bundled(name).get("NumberOfFrames") or 1)
    assert got == [f.data for f in expected]
    if not bundled(name).file_meta.TransferSyntaxUID.is_compressed:  # native: the frames tile the Pixel Data
        pixels = bundled(name).PixelData
        assert b"".join(got) == pixels[: len(got) * len(got[0])] and len(pixels) - len(b"".join(got)) <= 1


def test_frames_as_stored_refuses_what_it_cannot_read_one_by_one() -> None:
    ds = make_dataset(gradient_frames(1, 16, 16, "uint8"), photometric="MONOCHROME2", transfer_syntax=DEFLATED_EXPLICIT_VR_LE)
    with pytest.raises(TranscodeError, match="one by one"):
        frames_as_stored(io.BytesIO(part10(ds)))
    ds = make_dataset(gradient_frames(1, 16, 16, "uint8"), photometric="MONOCHROME2")
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.Rows, ds.Columns = 1, 1, 0, 15, 15
    ds.PixelData = b"\x00" * 32
    with pytest.raises(TranscodeError, match="byte boundary"):
        frames_as_stored(io.BytesIO(part10(ds)))
    ds = make_dataset(gradient_frames(3, 16, 16, "uint16"), photometric="MONOCHROME2")
    ds.NumberOfFrames = 4
    with pytest.raises(TranscodeError, match="frames need"):
        frames_as_stored(io.BytesIO(part10(ds)))
