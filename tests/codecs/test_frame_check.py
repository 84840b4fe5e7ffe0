"""actual_syntax: an archive's label on a frame is checked against the bytes (Orthanc 1.10
labels the raw HTJ2K codestream of an HTJ2K instance as Explicit VR Little Endian)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import generate_frames

from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frame_check import actual_syntax, convert_frame, convertible
from gateway.codecs.frames import decode_frame, encode_frame

ELE = "1.2.840.10008.1.2.1"
HTJ2K = "1.2.840.10008.1.2.4.201"
J2K = "1.2.840.10008.1.2.4.90"
RLE = "1.2.840.10008.1.2.5"
JPEG_LS = "1.2.840.10008.1.2.4.80"


@pytest.fixture(scope="module")
def ct() -> tuple[np.ndarray, PixelDescription, bytes]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return ds.pixel_array, PixelDescription.from_dataset(ds), ds.PixelData


def test_a_true_label_is_kept(ct) -> None:  # type: ignore[no-untyped-def]
    arr, desc, native = ct
    assert actual_syntax(native, ELE, desc) == ELE
    assert actual_syntax(encode_frame(arr, HTJ2K, desc), HTJ2K, desc) == HTJ2K
    assert actual_syntax(encode_frame(arr, RLE, desc), RLE, desc) == RLE


def test_a_codestream_labelled_native_is_recognised(ct) -> None:  # type: ignore[no-untyped-def]
    arr, desc, _ = ct
    assert actual_syntax(encode_frame(arr, HTJ2K, desc), ELE, desc) == HTJ2K
    assert actual_syntax(encode_frame(arr, J2K, desc), ELE, desc) == J2K
    jls = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    (codestream,) = generate_frames(jls.PixelData, number_of_frames=1)
    assert actual_syntax(codestream, ELE, PixelDescription.from_dataset(jls)) == JPEG_LS  # no encoder of ours
    assert actual_syntax(encode_frame(arr, RLE, desc), ELE, desc) == RLE
    # J2K and HTJ2K labelled as each other
    assert actual_syntax(encode_frame(arr, J2K, desc), HTJ2K, desc) == J2K


def test_bytes_that_fit_nothing_are_refused(ct) -> None:  # type: ignore[no-untyped-def]
    _, desc, native = ct
    with pytest.raises(TranscodeError, match="bytes"):
        actual_syntax(native[:100], ELE, desc)


def test_conversion_is_lossless_and_says_what_it_cannot_do(ct) -> None:  # type: ignore[no-untyped-def]
    arr, desc, native = ct
    stream = convert_frame(native, ELE, HTJ2K, desc)
    assert np.array_equal(decode_frame(stream, HTJ2K, desc), arr)
    assert convert_frame(stream, HTJ2K, ELE, desc) == native
    assert convertible(ELE, "1.2.840.10008.1.2.4.50", desc)  # JPEG baseline: 8-bit only
    assert convertible(HTJ2K, ELE, desc) is None
