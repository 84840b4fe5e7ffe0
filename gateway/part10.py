"""The File Meta group of a DICOM Part 10 file (PS3.10 7.1), read and written directly.

The group is a few explicit VR little endian elements at the start of the file, and a
pydicom parse costs ten times as much as walking them, on every instance of a
retrieval or a streamed series. One reader for the whole gateway, importing nothing of
ours, so that the archive clients (which learn the syntax an answer came in) and the
retrieval engine (which also needs the SOP UIDs and where the data set starts) agree
on what a file says; and one writer, for the C-STORE receiver and the instances STOW-RS
builds from metadata.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

# What the gateway names itself in associations and in the File Meta it writes.
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.60826662343822680984516461294576239553"
IMPLEMENTATION_VERSION_NAME = "DICOMGW_010"
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
META_HEAD = 64 * 1024  # the File Meta group is never near this long: read this much
# The File Preamble before ``DICM`` (PS3.10 7.1): all zeros when no profile uses it.
PREAMBLE = 128


class FileMeta(NamedTuple):
    transfer_syntax: str
    sop_class_uid: str  # "" when the file names none
    sop_instance_uid: str  # "" when the file names none
    dataset_offset: int  # where the data set starts, within the file


def read_file_meta(head: bytes | memoryview) -> FileMeta:
    """What the File Meta at the start of ``head`` (the file's first META_HEAD bytes, or
    all of it if shorter) says; raises ValueError when ``head`` is not a Part 10 file
    with a Transfer Syntax UID. A view of an instance held in memory does, with no
    copy of its head."""
    if head[128:132] == b"DICM":
        pos = 132
    elif head[:2] == b"\x02\x00":
        pos = 0  # an archive that sends the meta group without the preamble
    else:
        raise ValueError("not a DICOM Part 10 file")
    values: dict[int, str] = {}
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if start + length > len(head):
            raise ValueError("File Meta element runs past the end")
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = bytes(head[start : start + length]).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if 0x0010 not in values:
        raise ValueError("File Meta without a Transfer Syntax UID")
    return FileMeta(values[0x0010], values.get(0x0002, ""), values.get(0x0003, ""), pos)


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1).

    Encoded directly: it is written once per received instance, and a general data
    set writer costs more than the rest of the receive path together.
    """
    body = b"".join(
        [
            _meta_element(0x0001, b"OB", b"\x00\x01", b"\x00"),
            _meta_element(0x0002, b"UI", sop_class.encode("ascii", "replace"), b"\x00"),
            _meta_element(0x0003, b"UI", sop_instance.encode("ascii", "replace"), b"\x00"),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" "),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16], b" "),
        ]
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return bytes(PREAMBLE) + b"DICM" + group_length + body
