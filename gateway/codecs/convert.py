"""Dataset-level transfer syntax conversion for C-MOVE/C-GET and the facade.

Only the pixel data, the Image Pixel attributes it forces (Photometric
Interpretation, Planar Configuration, Bits Stored/High Bit, Number of
Frames), the lossy-compression attributes and the Transfer Syntax UID
change; every other element, SOP Instance UID included, is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from gateway.codecs import _htj2k
from gateway.codecs._byteorder import swap_dataset
from gateway.codecs.codestream import check_codestream
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frames import encode_frame, encoded_description, native_bytes
from gateway.codecs.syntaxes import (
    EXPLICIT_VR_BE,
    JPEG_BASELINE,
    Fidelity,
    rgb_on_decode,
    source_syntax,
    syntax_info,
)

# LossyImageCompressionMethod defined terms for the lossy encoders we have.
_LOSSY_METHODS = {JPEG_BASELINE: "ISO_10918_1"}
# Basic Offset Table offsets are 32-bit; past this an Extended Offset Table is needed.
_MAX_BOT_OFFSET = 2**32 - 1


def transcode(ds: Dataset, target_ts: str, *, allow_lossy: bool = False) -> Dataset:
    """Return a copy of `ds` re-encoded in `target_ts`.

    Raises TranscodeError when the source cannot be decoded, the target
    cannot carry this pixel data, or the conversion would be lossy and
    `allow_lossy` is False. `ds` itself is never modified.
    """
    target = syntax_info(target_ts)
    if not target.can_encode:
        raise TranscodeError(f"the gateway has no encoder for {target.name}")
    source_uid = source_syntax(ds)
    if source_uid == target.uid:
        return copy.deepcopy(ds)

    if "PixelData" not in ds or (not _is_encapsulated(source_uid) and target.native):
        if target.encapsulated:
            raise TranscodeError(
                f"cannot convert to {target.name}: the dataset has no (7FE0,0010) "
                "Pixel Data to compress; use a native (uncompressed) transfer syntax"
            )
        out = copy.deepcopy(ds)
        _renative(out, source_uid, target.uid)
        return out

    source = syntax_info(source_uid)
    if not source.can_decode:
        raise TranscodeError(f"cannot decode {source.name}")
    if not target.encode_lossless and not allow_lossy:
        raise TranscodeError(
            f"converting to {target.name} is lossy; pass allow_lossy=True to permit it"
        )
    out = copy.deepcopy(ds)
    frames = _decoded_frames(ds, source.uid)
    if target.native:
        desc, count, pixel_bytes = _native_pixels(frames, target.uid)
        _set_native_pixel_data(out, pixel_bytes, desc)
    else:
        desc, encoded = _encoded_pixels(frames, target.uid)
        count = len(encoded)
        _set_encapsulated_pixel_data(out, encoded)
        if not target.encode_lossless:
            _mark_lossy(out, target.uid, desc, encoded)
    _update_image_pixel(out, desc, count)
    if source.fidelity is Fidelity.LOSSY and "LossyImageCompression" not in out:
        # The values were lossy-compressed once; a native copy must still say so.
        out.LossyImageCompression = "01"
    out.file_meta.TransferSyntaxUID = target.uid
    return out


def _is_encapsulated(uid: UID) -> bool:
    """Whether `uid` encapsulates pixel data; unknown private syntaxes count as native.

    Only datasets without Pixel Data reach this with an unknown syntax, and
    for those re-encoding the already parsed elements is always possible.
    """
    try:
        return syntax_info(uid).encapsulated
    except TranscodeError:
        return False


def _renative(out: Dataset, source: UID, target: UID) -> None:
    """Switch between native syntaxes: only byte order can need work."""
    source_little = source != EXPLICIT_VR_BE
    if source_little != (target != EXPLICIT_VR_BE):
        swap_dataset(out, source_little_endian=source_little)
    out.file_meta.TransferSyntaxUID = target


def _decoded_frames(ds: Dataset, source: UID) -> Iterator[tuple[np.ndarray, PixelDescription]]:
    """Yield each frame with its description, wrapping codec failures.

    A plugin that fails on the first frame is replaced by the next attempt
    (see ``_htj2k.plugin_attempts``); a failure after frames were handed out
    cannot be retried and is reported.
    """
    if syntax_info(source).encapsulated:
        desc = PixelDescription.from_dataset(ds)
        frames = int(ds.get("NumberOfFrames") or 1)
        for frame in generate_frames(ds.PixelData, number_of_frames=frames):
            check_codestream(frame, desc)
    decoder = get_decoder(source)
    for plugin in _htj2k.plugin_attempts(source):
        started = False
        try:
            for arr, props in decoder.iter_array(
                ds, as_rgb=rgb_on_decode(source), decoding_plugin=plugin
            ):
                started = True
                yield arr, PixelDescription.from_pixel_properties(props)
            return
        except Exception as exc:  # codec libraries raise assorted types
            failure = exc
            if started:
                break
    raise TranscodeError(f"cannot decode {source.name} pixel data: {failure}") from failure


def _native_pixels(
    frames: Iterator[tuple[np.ndarray, PixelDescription]], target: UID
) -> tuple[PixelDescription, int, bytes]:
    """Concatenate frames in the target byte order, converting as they arrive."""
    little = target != EXPLICIT_VR_BE
    chunks: list[bytes] = []
    one_bit: list[np.ndarray] = []  # 1-bit frames are not byte aligned: pack them together
    desc: PixelDescription | None = None
    for arr, frame_desc in frames:
        desc = desc or frame_desc
        if desc.bits_allocated == 1:
            one_bit.append(arr)
        else:
            chunks.append(native_bytes(arr, desc, little_endian=little))
    if desc is None:
        raise TranscodeError("the Pixel Data holds no frames")
    if one_bit:
        return desc, len(one_bit), native_bytes(np.stack(one_bit), desc, little_endian=little)
    return desc, len(chunks), b"".join(chunks)


def _encoded_pixels(
    frames: Iterator[tuple[np.ndarray, PixelDescription]], target: UID
) -> tuple[PixelDescription, list[bytes]]:
    encoded: list[bytes] = []
    desc: PixelDescription | None = None
    for arr, frame_desc in frames:
        desc = desc or frame_desc
        encoded.append(encode_frame(arr, target, desc))
    if desc is None:
        raise TranscodeError("the Pixel Data holds no frames")
    return encoded_description(target, desc), encoded


def _set_native_pixel_data(out: Dataset, data: bytes, desc: PixelDescription) -> None:
    if len(data) % 2:
        data += b"\x00"
    out.PixelData = data
    elem = out["PixelData"]
    elem.VR = "OB" if desc.bits_allocated <= 8 else "OW"
    elem.is_undefined_length = False
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in out:
            del out[keyword]


def _set_encapsulated_pixel_data(out: Dataset, encoded: list[bytes]) -> None:
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in out:
            del out[keyword]
    last_offset = sum(len(f) + (len(f) % 2) + 8 for f in encoded[:-1])
    if last_offset > _MAX_BOT_OFFSET:
        out.PixelData, out.ExtendedOffsetTable, out.ExtendedOffsetTableLengths = (
            encapsulate_extended(encoded)
        )
    else:
        out.PixelData = encapsulate(encoded)
    elem = out["PixelData"]
    elem.VR = "OB"
    elem.is_undefined_length = True


def _update_image_pixel(out: Dataset, desc: PixelDescription, count: int) -> None:
    out.PhotometricInterpretation = desc.photometric_interpretation
    out.BitsAllocated = desc.bits_allocated
    if int(out.BitsStored) != desc.bits_stored:
        out.BitsStored = desc.bits_stored
        out.HighBit = desc.bits_stored - 1
    if desc.samples_per_pixel > 1:
        out.PlanarConfiguration = desc.planar_configuration
    if "NumberOfFrames" in out or count > 1:
        out.NumberOfFrames = count


def _mark_lossy(out: Dataset, target: UID, desc: PixelDescription, encoded: list[bytes]) -> None:
    """Record this lossy step after any earlier ones (PS3.3 C.7.6.1.1.5)."""
    uncompressed = len(encoded) * int(np.prod(desc.shape)) * desc.dtype.itemsize
    ratio = uncompressed / max(sum(len(frame) for frame in encoded), 1)
    out.LossyImageCompression = "01"
    out.LossyImageCompressionRatio = [
        *_values(out, "LossyImageCompressionRatio"),
        f"{ratio:.2f}"[:16],
    ]
    out.LossyImageCompressionMethod = [
        *_values(out, "LossyImageCompressionMethod"),
        _LOSSY_METHODS[target],
    ]


def _values(ds: Dataset, keyword: str) -> list:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue) else [value]
