"""What a frame really is, and one frame converted to another transfer syntax.

An archive's label on a frame is not proof: Orthanc 1.10 answers a request for
Explicit VR Little Endian frames of an HTJ2K instance with the HTJ2K codestream
labelled as ELE. A native frame has exactly the size the pixel description gives;
a compressed one starts with its codec's marker. `actual_syntax` checks the label
against both and, when they disagree, names the syntax the bytes show.
"""

from __future__ import annotations

import struct

from gateway.codecs.codestream import jpeg_start_of_frame
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frames import decode_frame_described, encode_frame, encode_problem, native_bytes
from gateway.codecs.syntaxes import (
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K_FAMILY,
    HTJ2K_LOSSLESS,
    IMPLICIT_VR_LE,
    JPEG2000_FAMILY,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_FAMILY,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
    syntax_info,
)

NATIVE_LE = frozenset({EXPLICIT_VR_LE, IMPLICIT_VR_LE})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def native_frame_size(desc: PixelDescription) -> int:
    """Bytes of one native frame (bit-packed for 1-bit data, PS3.5 8.1.1)."""
    bits = desc.rows * desc.columns * desc.samples_per_pixel * desc.bits_allocated
    if desc.photometric_interpretation == "YBR_FULL_422" and desc.samples_per_pixel == 3:
        bits = bits // 3 * 2
    return (bits + 7) // 8


# The JPEG processes a start-of-frame marker names (others are not served here).
_JPEG_PROCESSES = {
    0xC0: JPEG_BASELINE, 0xC1: JPEG_EXTENDED, 0xC2: JPEG_EXTENDED, 0xC3: JPEG_LOSSLESS_SV1, 0xF7: JPEG_LS_LOSSLESS,
}


def _jpeg_syntax(data: bytes) -> str | None:
    """The JPEG process of a codestream, from its start-of-frame marker."""
    try:
        found = jpeg_start_of_frame(data)
    except struct.error:
        return None
    return _JPEG_PROCESSES.get(found[0]) if found is not None else None


def _j2k_syntax(data: bytes) -> str:
    """HTJ2K when the main header has a CAP marker (Part 15 capabilities), else J2K."""
    header_end = data.find(b"\xff\x90")  # first tile-part (SOT)
    main = data[: header_end if header_end > 0 else 4096]
    return HTJ2K_LOSSLESS if b"\xff\x50" in main else JPEG2000_LOSSLESS


def sniffed_syntax(data: bytes) -> str | None:
    """The family a compressed frame's first bytes show (None: not recognised)."""
    if data.startswith(b"\xff\xd8"):
        return _jpeg_syntax(data)
    if data.startswith(_J2K_SOC_SIZ) or data.startswith(_JP2_SIGNATURE):
        return _j2k_syntax(data)
    if len(data) >= 64:
        (segments,) = struct.unpack("<I", data[:4])
        if 1 <= segments <= 15 and struct.unpack("<I", data[4:8])[0] == 64:
            return RLE_LOSSLESS
    return None


def _family(uid: str) -> frozenset[str]:
    if uid in JPEG_FAMILY or uid == JPEG_LS_LOSSLESS or uid == "1.2.840.10008.1.2.4.81":
        return frozenset({*JPEG_FAMILY, JPEG_LS_LOSSLESS, "1.2.840.10008.1.2.4.81"})
    if uid in JPEG2000_FAMILY or uid in HTJ2K_FAMILY:
        return frozenset({*JPEG2000_FAMILY, *HTJ2K_FAMILY})
    return frozenset({uid})


def actual_syntax(data: bytes, label: str, desc: PixelDescription) -> str:
    """The syntax ``data`` is in: ``label`` when the bytes agree with it, else what they
    show; TranscodeError when neither makes sense of them."""
    if label in NATIVE_LE or label == EXPLICIT_VR_BE:
        if len(data) in (native_frame_size(desc), native_frame_size(desc) + 1):
            return label  # one pad byte keeps an odd-length frame even
        sniffed = sniffed_syntax(data)
        if sniffed is None:
            raise TranscodeError(f"a frame labelled {label} has {len(data)} bytes, not {native_frame_size(desc)}")
        return sniffed
    sniffed = sniffed_syntax(data)
    if sniffed is None or sniffed in _family(label):
        if sniffed in HTJ2K_FAMILY and label in JPEG2000_FAMILY or sniffed in JPEG2000_FAMILY and label in HTJ2K_FAMILY:
            return sniffed
        return label
    return sniffed


def same_bytes(source: str, target: str) -> bool:
    """Whether a frame in ``source`` is already one in ``target`` (no conversion)."""
    return source == target or (source in NATIVE_LE and target in NATIVE_LE)


def convertible(source: str, target: str, desc: PixelDescription) -> str | None:
    """Why a frame of ``source`` cannot be served as ``target`` (None: it can)."""
    if same_bytes(source, target):
        return None
    try:
        info = syntax_info(source)
    except TranscodeError as exc:
        return str(exc)
    if not info.can_decode:
        return f"cannot decode {info.name}"
    if target in NATIVE_LE:
        return None
    return encode_problem(target, desc)


def convert_frame(data: bytes, source: str, target: str, desc: PixelDescription) -> bytes:
    """One frame re-encoded from ``source`` to ``target`` (blocking, CPU-bound). Colour
    comes out RGB when decoded, as pydicom's own ``pixel_array`` gives it."""
    if same_bytes(source, target):
        return data
    arr, decoded = decode_frame_described(data, source, desc, as_rgb=True)
    if target in NATIVE_LE:
        return native_bytes(arr, decoded, little_endian=True)
    return encode_frame(arr, target, decoded)

