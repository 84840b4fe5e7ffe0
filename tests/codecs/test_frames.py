"""Frame-level codec functions used by the DICOMweb facade."""

from __future__ import annotations

import imagecodecs
import numpy as np
import pytest
from pydicom.encaps import generate_frames

from gateway.codecs import (
    PixelDescription,
    TranscodeError,
    decode_frame,
    decode_frame_described,
    encode_frame,
    encode_problem,
    encoded_description,
)
from gateway.codecs.frames import MAX_DECODED_SAMPLES
from gateway.codecs.syntaxes import (
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    HTJ2K_LOSSLESS_RPCL,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    RLE_LOSSLESS,
)
from tests.codecs.helpers import bundled, gradient_frames

CT = PixelDescription(48, 40, 1, 16, 12, 1, "MONOCHROME2")
RGB = PixelDescription(48, 40, 3, 8, 8, 0, "RGB")


def _markers(codestream: bytes) -> dict[int, bytes]:
    """Main-header marker segments of a J2K codestream, up to the first SOT."""
    found, offset = {}, 2
    while offset < len(codestream):
        marker = int.from_bytes(codestream[offset : offset + 2], "big")
        length = int.from_bytes(codestream[offset + 2 : offset + 4], "big")
        found[marker] = codestream[offset + 4 : offset + 2 + length]
        if marker == 0xFF90:  # SOT: main header done
            return found
        offset += 2 + length
    return found


def test_from_dataset_reads_the_image_pixel_module() -> None:
    desc = PixelDescription.from_dataset(bundled("SC_rgb_rle.dcm"))
    assert desc == PixelDescription(100, 100, 3, 8, 8, 0, "RGB", 0)
    assert desc.shape == (100, 100, 3)
    assert desc.dtype == np.uint8


def test_from_dataset_names_missing_attributes() -> None:
    ds = bundled("CT_small.dcm")
    del ds.BitsStored
    with pytest.raises(TranscodeError, match="BitsStored"):
        PixelDescription.from_dataset(ds)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rows", 0),
        ("samples_per_pixel", 2),
        ("bits_allocated", 12),
        ("bits_stored", 17),
        ("pixel_representation", 2),
        ("photometric_interpretation", "RGB"),
        ("planar_configuration", 3),
    ],
)
def test_description_validation_names_the_field(field: str, value: object) -> None:
    fields = dict(
        rows=8,
        columns=8,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=12,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
    )
    fields[field] = value
    with pytest.raises(ValueError, match=field):
        PixelDescription(**fields)


@pytest.mark.parametrize(
    "ts",
    [
        JPEG2000_LOSSLESS,
        HTJ2K_LOSSLESS,
        HTJ2K_LOSSLESS_RPCL,
        HTJ2K,
        RLE_LOSSLESS,
        EXPLICIT_VR_LE,
        EXPLICIT_VR_BE,
    ],
)
@pytest.mark.parametrize("desc", [CT, RGB], ids=["ct", "rgb"])
def test_encode_then_decode_is_exact(ts: str, desc: PixelDescription) -> None:
    samples = desc.samples_per_pixel
    arr = gradient_frames(
        1, desc.rows, desc.columns, desc.dtype.str, samples=samples, bits=desc.bits_stored
    )[0]
    data = encode_frame(arr, ts, desc)
    decoded, decoded_desc = decode_frame_described(data, ts, encoded_description(ts, desc))
    np.testing.assert_array_equal(decoded, arr)
    assert decoded.dtype == desc.dtype
    assert decoded_desc.photometric_interpretation == desc.photometric_interpretation


def test_htj2k_frames_are_decoded_by_imagecodecs(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = imagecodecs.htj2k_decode

    def spy(data: bytes, **kwargs: object) -> np.ndarray:
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(imagecodecs, "htj2k_decode", spy)
    arr = gradient_frames(1, CT.rows, CT.columns, "i2", bits=12)[0]
    data = encode_frame(arr, HTJ2K_LOSSLESS, CT)
    np.testing.assert_array_equal(decode_frame(data, HTJ2K_LOSSLESS, CT), arr)
    assert calls == [len(data)]


def test_htj2k_with_colour_transform_decodes_to_rgb() -> None:
    arr = gradient_frames(1, 32, 48, "u1", samples=3)[0]
    data = imagecodecs.htj2k_encode(arr, reversible=True)  # MCT on by default
    desc = PixelDescription(32, 48, 3, 8, 8, 0, "YBR_RCT")
    decoded, decoded_desc = decode_frame_described(data, HTJ2K_LOSSLESS, desc)
    np.testing.assert_array_equal(decoded, arr)
    assert decoded_desc.photometric_interpretation == "RGB"


def test_part1_codestream_labelled_htj2k_falls_back_to_openjpeg() -> None:
    ds = bundled("MR_small_jp2klossless.dcm")
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    decoded = decode_frame(frame, HTJ2K, PixelDescription.from_dataset(ds))
    np.testing.assert_array_equal(decoded, bundled("MR_small.dcm").pixel_array)


def test_rpcl_codestream_follows_ps3_5() -> None:
    desc = PixelDescription(16, 4096, 1, 16, 16, 0, "MONOCHROME2")
    arr = np.tile(np.arange(4096, dtype=np.uint16), (16, 1))
    markers = _markers(encode_frame(arr, HTJ2K_LOSSLESS_RPCL, desc))
    cod = markers[0xFF52]
    assert cod[1] == 2  # progression order RPCL
    assert cod[5] >= 6  # 4096 / 2**6 = 64 px base resolution
    assert 0xFF55 in markers  # TLM
    assert 0xFF50 in markers  # CAP: HT block coder
    assert cod[9] == 1  # reversible 5-3 wavelet


def test_encoded_description_reports_what_changed() -> None:
    assert encoded_description(HTJ2K_LOSSLESS, CT).bits_stored == 16
    assert encoded_description(JPEG2000_LOSSLESS, CT) == CT
    assert encoded_description(JPEG_BASELINE, RGB).photometric_interpretation == "YBR_FULL_422"


@pytest.mark.parametrize(
    ("ts", "desc", "message"),
    [
        (JPEG2000_LOSSLESS, PixelDescription(3, 3, 1, 8, 8, 0, "MONOCHROME2"), "at least 32"),
        (RLE_LOSSLESS, PixelDescription(8, 8, 1, 32, 32, 0, "MONOCHROME2"), "32-bit"),
        (JPEG_BASELINE, CT, "unsigned 8-bit"),
        (HTJ2K_LOSSLESS, PixelDescription(8, 8, 1, 1, 1, 0, "MONOCHROME2"), "1-bit"),
        ("1.2.840.10008.1.2.4.80", CT, "no encoder"),
    ],
)
def test_encode_problem_explains(ts: str, desc: PixelDescription, message: str) -> None:
    assert message in (encode_problem(ts, desc) or "")


def test_encode_frame_validates_its_arguments() -> None:
    arr = np.zeros(CT.shape, np.int16)
    with pytest.raises(ValueError, match="arr has shape"):
        encode_frame(arr[:-1], HTJ2K_LOSSLESS, CT)
    with pytest.raises(ValueError, match="arr has dtype"):
        encode_frame(arr.astype(np.float32), HTJ2K_LOSSLESS, CT)
    with pytest.raises(TypeError, match="arr must be"):
        encode_frame(arr.tolist(), HTJ2K_LOSSLESS, CT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="desc must be"):
        encode_frame(arr, HTJ2K_LOSSLESS, {"rows": 48})  # type: ignore[arg-type]
    with pytest.raises(TranscodeError, match="cannot encode as JPEG Baseline"):
        encode_frame(arr, JPEG_BASELINE, CT)


def test_decode_frame_validates_its_arguments() -> None:
    with pytest.raises(TypeError, match="data must be bytes"):
        decode_frame("not bytes", HTJ2K_LOSSLESS, CT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="desc must be"):
        decode_frame(b"", HTJ2K_LOSSLESS, None)  # type: ignore[arg-type]
    with pytest.raises(TranscodeError, match="not handled"):
        decode_frame(b"", "1.2.3.4", CT)


def test_decode_frame_rejects_corrupt_or_short_data() -> None:
    with pytest.raises(TranscodeError, match="cannot decode High-Throughput"):
        decode_frame(b"\xff\x4f\xff\x51garbage", HTJ2K_LOSSLESS, CT)
    with pytest.raises(TranscodeError, match="cannot decode Explicit VR Little Endian"):
        decode_frame(b"\x00" * 10, EXPLICIT_VR_LE, CT)


def test_decode_frame_of_a_jpeg_baseline_frame_gives_rgb() -> None:
    ds = bundled("SC_rgb_jpeg_dcmtk.dcm")
    desc = PixelDescription.from_dataset(ds)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    decoded, decoded_desc = decode_frame_described(frame, ds.file_meta.TransferSyntaxUID, desc)
    assert decoded_desc.photometric_interpretation == "RGB"
    np.testing.assert_array_equal(decoded, ds.pixel_array)


def test_a_frame_described_larger_than_the_bound_is_not_decoded() -> None:
    """An RLE frame of a few kilobytes can describe gigabytes of zeros; the decoder
    would allocate them before reading a byte. Refused by its description instead."""
    desc = PixelDescription(20_000, 20_000, 1, 8, 8, 0, "MONOCHROME2")  # 400 M samples
    assert desc.rows * desc.columns > MAX_DECODED_SAMPLES
    with pytest.raises(TranscodeError, match="20000 x 20000 frame .* larger than the gateway decodes"):
        decode_frame(b"\x00" * 64, RLE_LOSSLESS, desc)
    small = PixelDescription(64, 64, 1, 8, 8, 0, "MONOCHROME2")
    frame = np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)
    assert np.array_equal(decode_frame(encode_frame(frame, RLE_LOSSLESS, small), RLE_LOSSLESS, small), frame)
