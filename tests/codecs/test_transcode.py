"""transcode(): lossless means bit-exact, and nothing but pixel encoding changes."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import UID

from gateway.codecs import TranscodeError, transcode
from gateway.codecs import convert
from gateway.codecs.syntaxes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    IMPLICIT_VR_LE,
    JPEG2000,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
)
from tests.codecs.helpers import (
    PIXEL_KEYWORDS,
    bundled,
    gradient_frames,
    make_dataset,
    non_pixel_values,
    reread,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # rtdose fixtures

NATIVE_TARGETS = [EXPLICIT_VR_LE, IMPLICIT_VR_LE, DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE]
LOSSLESS_ENCODINGS = [
    JPEG2000_LOSSLESS,
    JPEG2000,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    HTJ2K,
    RLE_LOSSLESS,
]


def assert_same_non_pixel(before: Dataset, after: Dataset) -> None:
    assert non_pixel_values(after) == non_pixel_values(before)
    assert after.SOPInstanceUID == before.SOPInstanceUID


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("rtdose_rle.dcm", "rtdose.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG lossless SV1 vs RLE
    ],
)
@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_lossless_sources_decompress_to_the_reference(
    compressed: str, reference: str, target: UID
) -> None:
    source = bundled(compressed)
    out = reread(transcode(source, target))
    assert out.file_meta.TransferSyntaxUID == target
    np.testing.assert_array_equal(out.pixel_array, bundled(reference).pixel_array)
    assert_same_non_pixel(source, out)


@pytest.mark.parametrize(
    "case",
    [
        "mono8",
        "mono16_bits12",
        "signed16_bits12",
        "signed8",
        "rgb8_2frames",
        "rgb16",
        "mono16_3frames",
    ],
)
@pytest.mark.parametrize("target", LOSSLESS_ENCODINGS)
def test_round_trip_through_lossless_encodings_is_bit_exact(case: str, target: UID) -> None:
    frames, photometric, bits = {
        "mono8": (gradient_frames(1, 40, 48, "u1"), "MONOCHROME2", None),
        "mono16_bits12": (gradient_frames(1, 40, 48, "u2", bits=12), "MONOCHROME2", 12),
        "signed16_bits12": (gradient_frames(1, 40, 48, "i2", bits=12), "MONOCHROME2", 12),
        "signed8": (gradient_frames(1, 40, 48, "i1"), "MONOCHROME1", None),
        "rgb8_2frames": (gradient_frames(2, 40, 48, "u1", samples=3), "RGB", None),
        "rgb16": (gradient_frames(1, 40, 48, "u2", samples=3), "RGB", None),
        "mono16_3frames": (gradient_frames(3, 40, 48, "u2"), "MONOCHROME2", None),
    }[case]
    original = make_dataset(frames, photometric=photometric, bits_stored=bits)
    encoded = reread(transcode(original, target))
    assert encoded.file_meta.TransferSyntaxUID == target
    assert encoded["PixelData"].is_undefined_length
    decoded = reread(transcode(encoded, EXPLICIT_VR_LE))
    expected = frames[0] if len(frames) == 1 else frames
    np.testing.assert_array_equal(encoded.pixel_array, expected)
    np.testing.assert_array_equal(decoded.pixel_array, expected)
    assert_same_non_pixel(original, decoded)
    assert decoded.PhotometricInterpretation == photometric
    assert decoded.get("NumberOfFrames", 1) == len(frames)


def test_multi_frame_output_has_a_basic_offset_table() -> None:
    frames = gradient_frames(3, 40, 48, "u2")
    out = transcode(make_dataset(frames, photometric="MONOCHROME2"), HTJ2K_LOSSLESS)
    first_item_length = int.from_bytes(out.PixelData[4:8], "little")
    assert first_item_length == 4 * 3  # one offset per frame
    for index in range(3):
        assert get_frame(out.PixelData, index, number_of_frames=3).startswith(b"\xff\x4f")


def test_large_output_switches_to_an_extended_offset_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(convert, "_MAX_BOT_OFFSET", 16)
    frames = gradient_frames(3, 40, 48, "u2")
    out = reread(transcode(make_dataset(frames, photometric="MONOCHROME2"), HTJ2K_LOSSLESS))
    assert len(out.ExtendedOffsetTableLengths) == 3 * 8
    np.testing.assert_array_equal(out.pixel_array, frames)
    back = transcode(out, EXPLICIT_VR_LE)
    assert "ExtendedOffsetTable" not in back


def test_encodings_rewrite_only_the_attributes_they_must() -> None:
    frames = gradient_frames(1, 40, 48, "i2", bits=12)
    original = make_dataset(frames, photometric="MONOCHROME2", bits_stored=12)
    htj2k = transcode(original, HTJ2K_LOSSLESS)
    # imagecodecs writes Bits Allocated bits of precision; the values are untouched.
    assert (htj2k.BitsStored, htj2k.HighBit) == (16, 15)
    j2k = transcode(original, JPEG2000_LOSSLESS)
    assert (j2k.BitsStored, j2k.HighBit) == (12, 11)
    for out in (htj2k, j2k):
        assert_same_non_pixel(original, out)
        assert "LossyImageCompression" not in out


def test_input_dataset_is_not_modified() -> None:
    source = bundled("MR_small_RLE.dcm")
    before = source.PixelData
    transcode(source, HTJ2K_LOSSLESS)
    assert source.PixelData == before
    assert source.file_meta.TransferSyntaxUID == RLE_LOSSLESS


def test_same_syntax_returns_an_equal_copy() -> None:
    source = bundled("CT_small.dcm")
    out = transcode(source, EXPLICIT_VR_LE)
    assert out is not source
    assert out == source


@pytest.mark.parametrize(
    ("name", "expected_fixture"),
    [
        ("MR_small.dcm", "MR_small_bigendian.dcm"),
        ("rtdose.dcm", "rtdose_expb.dcm"),
        ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"),
    ],
)
def test_big_endian_pixel_bytes_match_pydicom_fixtures(name: str, expected_fixture: str) -> None:
    out = transcode(bundled(name), EXPLICIT_VR_BE)
    assert out.PixelData == bundled(expected_fixture).PixelData


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "examples_palette.dcm",
        "examples_overlay.dcm",
        "waveform_ecg.dcm",
        "liver_1frame.dcm",
    ],
)
def test_big_endian_round_trip_is_byte_identical(name: str) -> None:
    source = bundled(name)
    big = reread(transcode(source, EXPLICIT_VR_BE))
    assert big.file_meta.TransferSyntaxUID == EXPLICIT_VR_BE
    back = reread(transcode(big, EXPLICIT_VR_LE))
    assert {int(e.tag): e.value for e in back} == {int(e.tag): e.value for e in source}
    if "PixelData" in source:
        np.testing.assert_array_equal(big.pixel_array, source.pixel_array)


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
@pytest.mark.parametrize("target", NATIVE_TARGETS)
def test_non_pixel_instances_re_encode_to_native_syntaxes(name: str, target: UID) -> None:
    source = bundled(name)
    out = reread(transcode(source, target))
    assert out.file_meta.TransferSyntaxUID == target
    if target != IMPLICIT_VR_LE:  # implicit VR cannot keep private VRs
        assert {int(e.tag): e.value for e in out} == {int(e.tag): e.value for e in source}


def test_non_pixel_instance_cannot_be_compressed() -> None:
    with pytest.raises(TranscodeError, match="no .*Pixel Data"):
        transcode(bundled("rtplan.dcm"), JPEG2000_LOSSLESS)


def test_jpeg_ybr_full_422_becomes_rgb_like_pydicom_decompress() -> None:
    source = bundled("examples_ybr_color.dcm")  # 30 frames, JPEG baseline YBR_FULL_422
    out = reread(transcode(source, EXPLICIT_VR_LE))
    assert out.PhotometricInterpretation == "RGB"
    assert out.PlanarConfiguration == 0
    assert out.NumberOfFrames == 30
    assert out.LossyImageCompression == "01"
    expected = bundled("examples_ybr_color.dcm")
    expected.decompress(generate_instance_uid=False)
    np.testing.assert_array_equal(out.pixel_array, expected.pixel_array)


def test_uncompressed_ybr_keeps_its_colour_space() -> None:
    source = bundled("SC_ybr_full_422_uncompressed.dcm")
    out = reread(transcode(source, RLE_LOSSLESS))
    assert out.PhotometricInterpretation == "YBR_FULL"  # 4:2:2 expanded, values exact
    np.testing.assert_array_equal(out.pixel_array, source.pixel_array)


def test_lossy_source_is_flagged_after_decompression() -> None:
    source = bundled("JPEGLSNearLossless_08.dcm")
    assert "LossyImageCompression" not in source
    assert transcode(source, EXPLICIT_VR_LE).LossyImageCompression == "01"


def test_jpeg_baseline_needs_permission_and_records_the_loss() -> None:
    source = bundled("SC_rgb_rle_2frame.dcm")
    with pytest.raises(TranscodeError, match="allow_lossy"):
        transcode(source, JPEG_BASELINE)
    out = reread(transcode(source, JPEG_BASELINE, allow_lossy=True))
    assert out.PhotometricInterpretation == "YBR_FULL_422"
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_10918_1"
    assert float(out.LossyImageCompressionRatio) > 1.0
    error = np.abs(out.pixel_array.astype(int) - source.pixel_array.astype(int))
    assert error.mean() < 3
    assert_same_non_pixel(source, out)


def htj2k_dataset(uid: UID, frames: np.ndarray, photometric: str, *, mct: bool) -> Dataset:
    """An HTJ2K dataset encoded straight with imagecodecs, not with our encoder."""
    ds = make_dataset(frames, photometric=photometric, transfer_syntax=uid)
    ds.PixelData = encapsulate(
        [imagecodecs.htj2k_encode(frame, reversible=True, rgb=mct) for frame in frames]
    )
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return ds


@pytest.mark.parametrize("uid", [HTJ2K_LOSSLESS, HTJ2K_LOSSLESS_RPCL, HTJ2K])
def test_htj2k_sources_decode_exactly(uid: UID) -> None:
    frames = gradient_frames(2, 64, 80, "i2", bits=16)
    source = htj2k_dataset(uid, frames, "MONOCHROME2", mct=False)
    out = reread(transcode(source, EXPLICIT_VR_LE))
    np.testing.assert_array_equal(out.pixel_array, frames)
    assert_same_non_pixel(source, out)


def test_htj2k_colour_transform_is_undone_to_rgb() -> None:
    frames = gradient_frames(1, 32, 48, "u1", samples=3)
    source = htj2k_dataset(HTJ2K_LOSSLESS, frames, "YBR_RCT", mct=True)
    out = reread(transcode(source, EXPLICIT_VR_LE))
    assert out.PhotometricInterpretation == "RGB"
    np.testing.assert_array_equal(out.pixel_array, frames[0])


def test_part1_codestream_labelled_htj2k_falls_back_to_openjpeg() -> None:
    source = bundled("MR_small_jp2klossless.dcm")
    source.file_meta.TransferSyntaxUID = HTJ2K  # OpenJPH rejects non-HT code-blocks
    out = transcode(source, EXPLICIT_VR_LE)
    np.testing.assert_array_equal(out.pixel_array, bundled("MR_small.dcm").pixel_array)


def test_undecodable_source_raises_a_clear_error() -> None:
    source = bundled("JPEG-lossy.dcm")  # a JPEG Extended file libjpeg rejects
    with pytest.raises(TranscodeError, match="cannot decode JPEG Extended") as info:
        transcode(source, EXPLICIT_VR_LE)
    assert isinstance(info.value.__cause__, Exception)


def test_corrupt_htj2k_raises_transcode_error() -> None:
    frames = gradient_frames(1, 32, 32, "u2")
    source = htj2k_dataset(HTJ2K_LOSSLESS, frames, "MONOCHROME2", mct=False)
    source.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 40])
    with pytest.raises(TranscodeError, match="cannot decode High-Throughput JPEG 2000"):
        transcode(source, EXPLICIT_VR_LE)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("1.2.840.10008.1.2.4.100", "not handled"),
        (JPEG_LS_LOSSLESS, "no encoder for JPEG-LS"),
    ],
)
def test_unsupported_targets_are_rejected(target: str, message: str) -> None:
    with pytest.raises(TranscodeError, match=message):
        transcode(bundled("CT_small.dcm"), target)


def test_target_that_cannot_carry_the_pixels_is_rejected() -> None:
    with pytest.raises(TranscodeError, match="RLE Lossless cannot carry 32-bit"):
        transcode(bundled("rtdose.dcm"), RLE_LOSSLESS)


def test_missing_transfer_syntax_is_rejected() -> None:
    source = bundled("CT_small.dcm")
    del source.file_meta.TransferSyntaxUID
    with pytest.raises(TranscodeError, match="Transfer Syntax UID"):
        transcode(source, EXPLICIT_VR_LE)


def test_pixel_keywords_cover_only_image_pixel_and_lossy_attributes() -> None:
    # Guard for the equality helper: it must not hide unrelated changes.
    assert not PIXEL_KEYWORDS & {"SOPInstanceUID", "PatientName", "StudyInstanceUID"}
