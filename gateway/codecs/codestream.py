"""The image size a compressed frame's own header gives, read before it is decoded.

Decoders size their output from the codestream, not from the instance's pixel
description: a 1 KB HTJ2K frame whose SIZ marker claims 30000 x 30000 pixels made
OpenJPH hand back a 30000 x 30000 array, and the daemon's memory peaked at 3.6 GB for
one frame request (5.3 GB to render it). So a frame is decoded only when its header
describes no more samples than the pixel description does.
"""

from __future__ import annotations

import struct

from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError

_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers: SOF0-3, 5-7, 9-11, 13-15, and JPEG-LS SOF55.
_SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  "


def codestream_samples(data: bytes) -> int | None:
    """Rows x columns x components as the frame's JPEG, JPEG-LS or JPEG 2000 header
    gives them; None when ``data`` is none of those or its header cannot be read (the
    decoder then judges it)."""
    try:
        if data.startswith(_JPEG_SOI):
            return _jpeg_samples(data)
        if data.startswith(_JP2_SIGNATURE):
            start = data.find(b"jp2c")
            data = data[start + 4 :] if start >= 0 else b""
        if data.startswith(_J2K_SOC_SIZ):
            # SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz, Csiz
            width, height, x0, y0 = struct.unpack_from(">IIII", data, 8)
            (components,) = struct.unpack_from(">H", data, 40)
            return max(width - x0, 0) * max(height - y0, 0) * components
    except struct.error:
        return None
    return None


def _jpeg_samples(data: bytes) -> int | None:
    found = jpeg_start_of_frame(data)
    if found is None:
        return None
    _, pos = found
    height, width, components = struct.unpack_from(">HHB", data, pos + 5)
    return height * width * components


def jpeg_start_of_frame(data: bytes) -> tuple[int, int] | None:
    """The first start-of-frame marker of a JPEG or JPEG-LS codestream and where it
    is, None when the scan data comes first or the markers cannot be walked."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF_MARKERS:
            return marker, pos
        if marker == 0xDA:  # scan data before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, pos + 2)
        pos += 2 + length
    return None


def check_codestream(data: bytes, desc: PixelDescription) -> None:
    """Raise TranscodeError when the frame's header describes more samples than
    ``desc``: decoding it would allocate for the header's size."""
    described = codestream_samples(data)
    allowed = desc.rows * desc.columns * desc.samples_per_pixel
    if described is not None and described > allowed:
        raise TranscodeError(
            f"the frame's codestream describes {described} samples, the pixel description {allowed}: not decoded"
        )
