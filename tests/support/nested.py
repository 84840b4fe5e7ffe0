"""Part 10 instances whose sequences nest to a chosen depth, written byte by byte:
pydicom (writing and reading) recurses per level and cannot make the deep ones."""

from __future__ import annotations

import struct

from pydicom.uid import generate_uid

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
UNDEFINED = 0xFFFFFFFF
CONTENT_SEQUENCE = (0x0040, 0xA730)


def _even(value: bytes, pad: bytes = b"\0") -> bytes:
    return value if len(value) % 2 == 0 else value + pad


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"SQ", b"UN", b"UT"):
        return struct.pack("<HH2sHI", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _sequences(depth: int, encoding: str) -> bytes:
    """Content Sequence in its one item, ``depth`` times, the innermost item empty.
    ``encoding``: "undefined" (explicit VR, undefined lengths), "defined" (explicit VR,
    defined lengths, as dcmtk's storescu sends them) or "implicit" (implicit VR,
    defined lengths: only the data dictionary says the element is a sequence)."""
    body = b""
    for _ in range(depth):
        if encoding == "undefined":
            body = (
                struct.pack("<HH2sHI", *CONTENT_SEQUENCE, b"SQ", 0, UNDEFINED)
                + struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + body + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
            )
        else:
            item = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
            body = _explicit(*CONTENT_SEQUENCE, b"SQ", item) if encoding == "defined" else _implicit(*CONTENT_SEQUENCE, item)
    return body


def nested_instance(depth: int, encoding: str = "undefined") -> tuple[bytes, str, str, str]:
    """A Basic Text SR whose Content Sequence nests ``depth`` levels: (file bytes, SOP
    Instance UID, Study Instance UID, Series Instance UID)."""
    sop, study, series = generate_uid(), generate_uid(), generate_uid()
    syntax = IMPLICIT_LE if encoding == "implicit" else EXPLICIT_LE
    meta_body = (
        _explicit(0x0002, 0x0001, b"OB", b"\0\1") + _explicit(0x0002, 0x0002, b"UI", _even(SR_STORAGE.encode()))
        + _explicit(0x0002, 0x0003, b"UI", _even(sop.encode())) + _explicit(0x0002, 0x0010, b"UI", _even(syntax.encode()))
    )
    meta = _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(meta_body))) + meta_body
    top = [
        (0x0008, 0x0016, b"UI", _even(SR_STORAGE.encode())),
        (0x0008, 0x0018, b"UI", _even(sop.encode())),
        (0x0008, 0x0060, b"CS", b"SR"),
        (0x0020, 0x000D, b"UI", _even(study.encode())),
        (0x0020, 0x000E, b"UI", _even(series.encode())),
    ]
    if encoding == "implicit":
        data = b"".join(_implicit(g, e, v) for g, e, _, v in top)
    else:
        data = b"".join(_explicit(g, e, vr, v) for g, e, vr, v in top)
    return b"\0" * 128 + b"DICM" + meta + data + _sequences(depth, encoding), sop, study, series
