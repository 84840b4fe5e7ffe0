"""Frame-level decode/encode: pure functions over bytes and a PixelDescription.

Arrays are always interleaved, shaped (rows, columns[, samples]) with a
native-endian dtype from ``PixelDescription.dtype``. pydicom does the work
wherever it has a codec; HTJ2K goes through imagecodecs (see ``_htj2k``).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder, get_encoder, pack_bits

from gateway.codecs import _htj2k, _jpeg
from gateway.codecs.codestream import check_codestream
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.syntaxes import (
    EXPLICIT_VR_BE,
    HTJ2K_FAMILY,
    JPEG2000_FAMILY,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    RLE_LOSSLESS,
    SyntaxInfo,
    syntax_info,
)

_MONO = ("MONOCHROME1", "MONOCHROME2")
# pylibjpeg-openjpeg: at most 24-bit samples, and its fixed 6 resolution
# levels need at least 2**5 pixels in each direction.
_OPENJPEG_MAX_BITS = 24
_OPENJPEG_MIN_SIZE = 32
# The largest frame decoded, in samples (rows x columns x samples per pixel): 2**28, a
# gigabyte of 32-bit samples. Decoders allocate the frame as described before reading
# the data, and an RLE frame of a few megabytes can describe gigabytes of zeros.
MAX_DECODED_SAMPLES = 1 << 28


def decode_frame(
    data: bytes, ts: str, desc: PixelDescription, *, as_rgb: bool = True
) -> np.ndarray:
    """Decode one frame of `ts`-encoded pixel data into an array.

    With `as_rgb` (the default, what viewers and renderers want) YBR colour
    frames come back as RGB; use :func:`decode_frame_described` to learn the
    resulting Photometric Interpretation.
    """
    return decode_frame_described(data, ts, desc, as_rgb=as_rgb)[0]


def decode_frame_described(
    data: bytes, ts: str, desc: PixelDescription, *, as_rgb: bool = True
) -> tuple[np.ndarray, PixelDescription]:
    """Like :func:`decode_frame`, also returning the array's own description.

    The description can differ from `desc`: colour may have been converted
    (YBR -> RGB, or a JPEG 2000 colour transform undone) and planar data is
    returned interleaved.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    if not isinstance(desc, PixelDescription):
        raise TypeError(f"desc must be a PixelDescription, got {type(desc).__name__}")
    info = syntax_info(ts)
    if not info.can_decode:
        raise TranscodeError(f"cannot decode {info.name}")
    if desc.rows * desc.columns * desc.samples_per_pixel > MAX_DECODED_SAMPLES:
        raise TranscodeError(
            f"a {desc.rows} x {desc.columns} frame of {desc.samples_per_pixel} sample(s) per pixel is larger than"
            f" the gateway decodes ({MAX_DECODED_SAMPLES} samples)"
        )
    options = desc.pydicom_options()
    source = bytes(data)
    if info.encapsulated:
        check_codestream(source, desc)
        source = encapsulate([source])
    else:
        options["pixel_keyword"] = "PixelData"  # pydicom asks for it with raw buffers
    decoder = get_decoder(info.uid)
    for plugin in _htj2k.plugin_attempts(info.uid):
        try:
            arr, props = decoder.as_array(source, as_rgb=as_rgb, decoding_plugin=plugin, **options)  # type: ignore[arg-type]  # pydicom types **kwargs as DecodeOptions, not Unpack[...]
            break
        except Exception as exc:  # codec libraries raise assorted types
            failure = exc
    else:
        raise TranscodeError(f"cannot decode {info.name} frame: {failure}") from failure
    # Big endian sources come back big endian; callers get native order.
    native = arr.astype(arr.dtype.newbyteorder("="), copy=False)
    return native, PixelDescription.from_pixel_properties(props)


def encoded_description(ts: str, desc: PixelDescription) -> PixelDescription:
    """Describe what :func:`encode_frame` produces for a frame described by `desc`.

    The caller must store these values with the encoded frame (transcode
    does): HTJ2K codestreams carry Bits Allocated bits of precision, JPEG
    baseline colour is YCbCr 4:2:2, and output is always colour-by-pixel.
    """
    info = syntax_info(ts)
    out = replace(desc, planar_configuration=0)
    if info.uid in HTJ2K_FAMILY:
        out = replace(out, bits_stored=out.bits_allocated)
    if info.uid == JPEG_BASELINE and desc.samples_per_pixel == 3:
        out = replace(out, photometric_interpretation="YBR_FULL_422")
    return out


def encode_problem(ts: str, desc: PixelDescription) -> str | None:
    """Why a frame described by `desc` cannot be encoded as `ts`, or None if it can."""
    try:
        info = syntax_info(ts)
    except TranscodeError as exc:
        return str(exc)
    if not info.can_encode:
        return f"the gateway has no encoder for {info.name}"
    if info.native:
        return None
    if desc.bits_allocated == 1:
        return "1-bit pixel data can only be stored in a native transfer syntax"
    return _compressed_problem(info, desc)


def _compressed_problem(info: SyntaxInfo, desc: PixelDescription) -> str | None:
    pi = desc.photometric_interpretation
    if desc.samples_per_pixel == 1:
        allowed_pi: tuple[str, ...] = (*_MONO, "PALETTE COLOR")
    else:
        allowed_pi = ("RGB", "YBR_FULL")
    allowed_bits: tuple[int, ...] = (8, 16, 32)
    if info.uid == RLE_LOSSLESS:
        allowed_bits = (8, 16)  # pydicom's RLE encoders stop at 16 bits
        if pi == "YBR_FULL" and desc.bits_allocated != 8:
            return "RLE Lossless carries YBR_FULL only with 8 bits allocated"
    elif info.uid == JPEG_BASELINE:
        allowed_pi = _MONO if desc.samples_per_pixel == 1 else ("RGB", "YBR_FULL")
        allowed_bits = (8,)
        if desc.bits_stored != 8 or desc.pixel_representation != 0:
            return "JPEG Baseline needs unsigned 8-bit samples"
    elif info.uid in JPEG2000_FAMILY:
        if desc.bits_stored > _OPENJPEG_MAX_BITS:
            return f"the JPEG 2000 encoder handles at most {_OPENJPEG_MAX_BITS} bits stored"
        if min(desc.rows, desc.columns) < _OPENJPEG_MIN_SIZE:
            return f"the JPEG 2000 encoder needs at least {_OPENJPEG_MIN_SIZE} rows and columns"
    if pi not in allowed_pi:
        return f"{info.name} cannot carry Photometric Interpretation {pi}"
    if desc.bits_allocated not in allowed_bits:
        return f"{info.name} cannot carry {desc.bits_allocated}-bit samples here"
    return None


def encode_frame(arr: np.ndarray, ts: str, desc: PixelDescription) -> bytes:
    """Encode one interleaved frame as `ts`; lossless except for JPEG baseline.

    Store the frame with the attributes from :func:`encoded_description`.
    """
    if not isinstance(desc, PixelDescription):
        raise TypeError(f"desc must be a PixelDescription, got {type(desc).__name__}")
    arr = _checked_array(arr, desc)
    info = syntax_info(ts)
    problem = encode_problem(info.uid, desc)
    if problem:
        raise TranscodeError(f"cannot encode as {info.name}: {problem}")
    if info.native:
        return native_bytes(arr, desc, little_endian=info.uid != EXPLICIT_VR_BE)
    try:
        if info.uid in HTJ2K_FAMILY:
            return _htj2k.encode(arr, info.uid)
        if info.uid == JPEG_BASELINE:
            return _jpeg.encode_baseline(arr, desc.photometric_interpretation)
        # JPEG 2000 (.91) gets the same reversible codestream as .90.
        encoder_uid = JPEG2000_LOSSLESS if info.uid in JPEG2000_FAMILY else info.uid
        options = replace(desc, planar_configuration=0).pydicom_options()
        return get_encoder(encoder_uid).encode(arr, **options)
    except Exception as exc:  # codec libraries raise assorted types
        raise TranscodeError(f"cannot encode as {info.name}: {exc}") from exc


def native_bytes(arr: np.ndarray, desc: PixelDescription, *, little_endian: bool) -> bytes:
    """Raw native-syntax bytes for one or more frames (1-bit data is bit-packed)."""
    if desc.bits_allocated == 1:
        return pack_bits(arr, pad=False)
    dtype = desc.dtype.newbyteorder("<") if little_endian else desc.dtype.newbyteorder(">")
    return arr.astype(dtype, copy=False).tobytes()


def _checked_array(arr: np.ndarray, desc: PixelDescription) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"arr must be a numpy.ndarray, got {type(arr).__name__}")
    if arr.shape != desc.shape:
        raise ValueError(f"arr has shape {arr.shape} but desc describes {desc.shape}")
    expected = desc.dtype
    if arr.dtype.kind != expected.kind or arr.dtype.itemsize != expected.itemsize:
        raise ValueError(f"arr has dtype {arr.dtype} but desc describes {expected}")
    return arr.astype(expected, copy=False)
