"""A fast structural check of a received data set: do the element lengths add up?

pydicom reads a value that runs past the end of the file as a short value without
complaint, so a data set cut off in transit would otherwise be stored and forwarded.
This walks the element headers (not the values) from the end of the file meta to
the end of the file, descending into undefined-length sequences and items, and
reports the first inconsistency. Deflated data sets cannot be walked without
inflating them and are left to the parser.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
# Explicit VRs whose length field is 4 bytes after 2 reserved bytes.
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = ("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.8.1")


class Truncated(ValueError):
    pass


class _Walker:
    def __init__(self, fh: BinaryIO, size: int, explicit: bool, little: bool) -> None:
        self.fh = fh
        self.size = size
        self.explicit = explicit
        self.e = "<" if little else ">"

    def read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise Truncated("element header runs past the end of the data set")
        return data

    def header(self) -> tuple[int, bytes | None, int]:
        group, element = struct.unpack(self.e + "HH", self.read(4))
        tag = (group << 16) | element
        if group == 0xFFFE:  # items and delimiters: always implicit style
            return tag, None, struct.unpack(self.e + "I", self.read(4))[0]
        if not self.explicit:
            return tag, None, struct.unpack(self.e + "I", self.read(4))[0]
        vr = self.read(2)
        if vr in LONG_VRS:
            self.read(2)
            return tag, vr, struct.unpack(self.e + "I", self.read(4))[0]
        return tag, vr, struct.unpack(self.e + "H", self.read(2))[0]

    def skip(self, length: int) -> None:
        end = self.fh.tell() + length
        if end > self.size:
            raise Truncated("a value runs past the end of the data set")
        self.fh.seek(end)

    def elements(self, until: int | None, end: int) -> None:
        """Walk elements up to ``end`` (defined length) or the ``until`` delimiter."""
        while self.fh.tell() < end:
            tag, vr, length = self.header()
            if until is not None and tag == until:
                return
            if length != UNDEFINED:
                self.skip(length)
                continue
            if vr in (b"SQ", b"UN", None, b"OB", b"OW"):
                self.items()
            else:
                raise Truncated("undefined length on a VR that cannot have one")
        if until is not None:
            raise Truncated("sequence or item not closed before the end of the data set")

    def items(self) -> None:
        """Walk the items of an undefined-length sequence or encapsulated pixel data."""
        while True:
            tag, _, length = self.header()
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise Truncated("expected an item or a sequence delimiter")
            if length == UNDEFINED:
                self.elements(ITEM_DELIMITER, self.size)
            else:
                self.skip(length)


def check_structure(fh: BinaryIO, dataset_offset: int, size: int, transfer_syntax: str) -> str | None:
    """None if the element lengths are consistent with the file, else the problem."""
    if transfer_syntax in DEFLATED:
        return None
    walker = _Walker(
        fh,
        size,
        explicit=transfer_syntax != IMPLICIT_LE,
        little=transfer_syntax != EXPLICIT_BE,
    )
    fh.seek(dataset_offset)
    try:
        walker.elements(None, size)
    except Truncated as exc:
        return str(exc)
    except struct.error:
        return "malformed element header"
    return None
