"""The image size a compressed frame's header gives, checked before it is decoded."""

from __future__ import annotations

import struct

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate, generate_frames

from gateway.codecs import decode_frame
from gateway.codecs.codestream import check_codestream, codestream_samples
from gateway.codecs.convert import transcode
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.syntaxes import JPEG_BASELINE, syntax_info
from tests.support.corpus import pydicom_corpus

IMAGE = (np.arange(64 * 48, dtype=np.uint16) % 4096).reshape(64, 48)
DESC = PixelDescription(64, 48, 1, 16, 12, 0, "MONOCHROME2")


def _enlarged(data: bytes, marker: bytes, at: int, fmt: str, *values: int) -> bytes:
    """``data`` with the values after ``marker`` (at ``at`` bytes past it) replaced."""
    out = bytearray(data)
    struct.pack_into(fmt, out, out.find(marker) + at, *values)
    return bytes(out)


CODESTREAMS = {
    # syntax: (a true 64 x 48 frame, the same claiming 30000 x 30000)
    "1.2.840.10008.1.2.4.201": (
        imagecodecs.htj2k_encode(IMAGE, level=0),
        lambda d: _enlarged(d, b"\xff\x51", 6, ">IIIIIIII", 30000, 30000, 0, 0, 30000, 30000, 0, 0),
    ),
    "1.2.840.10008.1.2.4.90": (
        imagecodecs.jpeg2k_encode(IMAGE, level=0, codecformat="j2k", reversible=True),
        lambda d: _enlarged(d, b"\xff\x51", 6, ">IIII", 30000, 30000, 0, 0),
    ),
    "1.2.840.10008.1.2.4.80": (imagecodecs.jpegls_encode(IMAGE), lambda d: _enlarged(d, b"\xff\xf7", 5, ">HH", 30000, 30000)),
    "1.2.840.10008.1.2.4.70": (imagecodecs.ljpeg_encode(IMAGE), lambda d: _enlarged(d, b"\xff\xc3", 5, ">HH", 30000, 30000)),
}


@pytest.mark.parametrize("syntax", sorted(CODESTREAMS))
def test_a_frame_claiming_more_pixels_than_described_is_not_decoded(syntax: str) -> None:
    """On the code before, each of these 1 KB frames was decoded into 900 million
    samples: 3.6-7 GB of the daemon's memory, for 90 s with JPEG-LS."""
    true, enlarge = CODESTREAMS[syntax]
    assert codestream_samples(true) == 64 * 48
    assert np.array_equal(decode_frame(true, syntax, DESC), IMAGE)
    inflated = enlarge(true)
    assert codestream_samples(inflated) == 30000 * 30000
    with pytest.raises(TranscodeError, match="codestream describes 900000000 samples, the pixel description 3072"):
        decode_frame(inflated, syntax, DESC)


def test_unreadable_or_unknown_headers_are_left_to_the_decoder() -> None:
    for data in (b"", b"\xff\xd8\xff", b"\xff\xd8\xff\xda\x00\x02", b"\xff\x4f\xff\x51\x00", b"RLE"):
        assert codestream_samples(data) is None
    check_codestream(b"\xff\x4f\xff\x51\x00", DESC)  # no verdict: no refusal


def test_no_corpus_frame_that_decodes_is_refused() -> None:
    """No false refusal: of pydicom's JPEG, JPEG-LS and JPEG 2000 test files, the only
    one refused is one no decoder reads (its SIZ marker overwritten by a sequence
    delimiter's bytes: 3.8 million million pixels, which Pillow refuses too)."""
    checked, refused = 0, []
    for item in pydicom_corpus(dcmtk_only=False):
        info = syntax_info(item.transfer_syntax_uid)
        if not info.encapsulated or info.uid == "1.2.840.10008.1.2.5":
            continue
        ds = pydicom.dcmread(item.path)
        desc = PixelDescription.from_dataset(ds)
        for frame in generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1)):
            checked += 1
            try:
                check_codestream(frame, desc)
            except TranscodeError:
                refused.append(item.path.name)
                with pytest.raises(Exception):
                    ds.pixel_array  # noqa: B018 - decoding is the assertion
                break
    assert checked > 20 and refused == ["JPEG2000-embedded-sequence-delimiter.dcm"], refused


def test_a_whole_instance_conversion_checks_every_frame_first() -> None:
    """The conversion of a whole instance (to a lossy syntax here) decodes through
    pydicom's own iteration: every frame is checked before the first is decoded."""
    true, enlarge = CODESTREAMS["1.2.840.10008.1.2.4.201"]
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.201"
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 64, 48, 2, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = encapsulate([true, enlarge(true)])
    with pytest.raises(TranscodeError, match="codestream describes 900000000 samples"):
        transcode(ds, JPEG_BASELINE, allow_lossy=True)
