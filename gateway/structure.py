"""One pass over a received Part 10 file: structure check plus the identifying values.

pydicom reads a value that runs past the end of the file as a short value without
complaint, so a data set cut off in transit would otherwise be stored and forwarded.
This walks the element headers (not the values) from the file meta to the end of the
file, descending into every sequence and item, reports the first inconsistency, and
keeps the values of the few top-level elements the spool needs. Sequences nested deeper
than `MAX_NESTING` are refused: nothing downstream could read them.
It replaces a pydicom parse on the C-STORE path, where it is several times cheaper.

A Deflated Explicit VR Little Endian data set is inflated as it is walked, a chunk at
a time into a temporary file (in memory while small), and refused past
`MAX_INFLATED` bytes: a few megabytes of deflated zeros inflate to gigabytes, which
pydicom, inflating a whole data set in memory at once, would make of any instance sent
that way. Every later reader of the stored instance (the embedded archive, the facade,
a conversion for a C-MOVE) inflates it with pydicom, so the bound holds for them too.
"""

from __future__ import annotations

import functools
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Protocol

from pydicom.datadict import dictionary_VR

from gateway.codecs.syntaxes import DEFLATED_EXPLICIT_VR_LE, EXPLICIT_VR_BE, IMPLICIT_VR_LE
from gateway.part10 import LONG_VRS


class Readable(Protocol):
    """What the walk needs of a file: a file object, or a window on one."""

    def read(self, size: int = -1, /) -> bytes: ...

    def seek(self, offset: int, whence: int = 0, /) -> int: ...

    def tell(self) -> int: ...

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF
MAX_KEPT_VALUE = 256

TRANSFER_SYNTAX_TAG = 0x00020010
# The most a deflated data set may inflate to; a larger one is refused (`Scan.oversized`).
MAX_INFLATED = 256 << 20
INFLATE_CHUNK = 1 << 20
INFLATED_IN_MEMORY = 8 << 20  # inflated data sets up to this stay in memory while walked
# The deepest nesting of sequences taken. Real IODs nest a handful of levels (SR content
# trees about ten). Readers recurse per level: pydicom and DICOM JSON fail at a few
# hundred, and Orthanc 1.10 dies on an instance nesting 48 (measured), so a gateway
# taking one would bring its archive down at every delivery attempt.
MAX_NESTING = 32

_DATA_SET, _SEQUENCE, _FRAGMENTS = 0, 1, 2  # what a level of the walk holds


class Malformed(ValueError):
    pass


@dataclass
class Scan:
    """What one pass found: the transfer syntax, kept values, and the first problem."""

    transfer_syntax: str = ""
    dataset_offset: int = 0
    values: dict[int, str] = field(default_factory=dict)
    problem: str | None = None
    oversized: bool = False  # past a bound (MAX_INFLATED, MAX_NESTING), not malformed: ``problem`` says which


class Oversized(Exception):
    pass


@functools.cache
def _dictionary_sq(tag: int) -> bool:
    """Whether the data dictionary makes ``tag`` a sequence (an implicit VR element)."""
    try:
        return dictionary_VR(tag) == "SQ"
    except KeyError:
        return False


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace").strip()


# Bytes read from the file at a time. The element headers before the pixel data of most
# instances fit in one window; each header is then unpacked from it in place.
WINDOW = 16 << 10
_IMPLICIT = {"<": struct.Struct("<HHI"), ">": struct.Struct(">HHI")}  # group, element, 32-bit length
_EXPLICIT = {"<": struct.Struct("<HH2sH"), ">": struct.Struct(">HH2sH")}  # group, element, VR, 16-bit length
_LONG = {"<": struct.Struct("<I"), ">": struct.Struct(">I")}


class _Walker:
    def __init__(self, fh: Readable, size: int, explicit: bool, little: bool, keep: frozenset[int]) -> None:
        self.fh = fh
        self.size = size
        self.explicit = explicit
        e = "<" if little else ">"
        self.implicit_header = _IMPLICIT[e]
        self.explicit_header = _EXPLICIT[e]
        self.long_length = _LONG[e]
        self.keep = keep
        self.values: dict[int, str] = {}
        # Kept here, not asked of the file: each tell() is a system call, and asking
        # at every element header was most of the walk's time. Headers are unpacked
        # from a window of the file (`WINDOW`), not read a few bytes per call: the
        # calls were most of what remained.
        self.pos = fh.tell()
        self.window = b""
        self.window_at = self.pos

    def _at(self, n: int) -> int:
        """Where the ``n`` bytes at ``pos`` start in ``window``, read from the file
        when the window does not hold them. Bounded by ``size``, not by the file: a
        spool record may sit in a longer file."""
        pos = self.pos
        if pos + n > self.size:
            raise Malformed("element runs past the end of the data set")
        at = pos - self.window_at
        if at < 0 or at + n > len(self.window):
            self.fh.seek(pos)
            self.window = self.fh.read(min(max(n, WINDOW), self.size - pos))
            self.window_at, at = pos, 0
            if len(self.window) < n:
                raise Malformed("element header runs past the end of the data set")
        return at

    def read(self, n: int) -> bytes:
        at = self._at(n)
        self.pos += n
        return self.window[at : at + n]

    def header(self) -> tuple[int, bytes | None, int]:
        at = self._at(8)
        self.pos += 8
        if not self.explicit:
            group, element, length = self.implicit_header.unpack_from(self.window, at)
            return (group << 16) | element, None, length
        group, element, vr, length = self.explicit_header.unpack_from(self.window, at)
        if group == 0xFFFE:  # items and delimiters: always implicit style
            return (group << 16) | element, None, self.long_length.unpack_from(self.window, at + 4)[0]
        if vr in LONG_VRS:
            at = self._at(4)  # after the two reserved bytes (``length`` held them)
            self.pos += 4
            return (group << 16) | element, vr, self.long_length.unpack_from(self.window, at)[0]
        return (group << 16) | element, vr, length

    def skip(self, length: int) -> None:
        end = self.pos + length
        if end > self.size:
            raise Malformed("a value runs past the end of the data set")
        self.pos = end

    def walk(self, end: int, top: bool) -> None:
        """Walk the elements up to ``end``, and every sequence and item within them.

        A stack, not recursion: a data set may nest sequences thousands deep in a few
        kilobytes, which would exhaust Python's recursion. Sequences deeper than
        `MAX_NESTING` are refused (Oversized), since every later reader of the instance
        (pydicom, DICOM JSON) recurses once or more per level. Defined-length sequences
        are walked too, so their depth counts: by their VR in explicit VR, by the data
        dictionary in implicit VR, as pydicom would read them. What does not parse
        inside a defined-length sequence is skipped to its end, as pydicom leaves such
        a value unread until asked: an instance taken before this walk descended into
        them is taken still.
        """
        # Each level: (kind, end, delimiter that closes it or None when ``end`` does).
        levels: list[tuple[int, int, int | None]] = [(_DATA_SET, end, None)]
        nesting = 0
        while levels:
            try:
                kind, level_end, _ = levels[-1]
                if kind == _DATA_SET:
                    self._skip_plain(level_end, top and len(levels) == 1)
                nesting = self._step(levels, nesting, top)
            except Malformed:
                outer = next((i for i in range(len(levels) - 1, 0, -1) if levels[i][0] == _SEQUENCE and levels[i][2] is None), None)
                if outer is None:
                    raise
                self.pos = levels[outer][1]
                nesting -= sum(kind == _SEQUENCE for kind, _, _ in levels[outer:])
                del levels[outer:]

    def _skip_plain(self, end: int, top: bool) -> None:
        """Step over the data set's plain elements (a defined length, no sequence, no
        value to keep) from ``pos`` while their headers are in the window, unpacked
        in place. Anything else, or anything wrong, is left at ``pos`` for `_step`,
        which reports it: this only saves `_step`'s calls on the usual elements, the
        most of a walk's time."""
        window, base, size, pos = self.window, self.window_at, self.size, self.pos
        limit = min(end, base + len(window)) - 12  # a whole header of either form fits
        keep = self.keep if top else frozenset()
        if self.explicit:
            unpack, long_length = self.explicit_header.unpack_from, self.long_length.unpack_from
            while base <= pos <= limit:
                group, element, vr, length = unpack(window, pos - base)
                if group == 0xFFFE or vr == b"SQ" or ((group << 16) | element) in keep:
                    break
                if vr in LONG_VRS:
                    length = long_length(window, pos - base + 8)[0]
                    if length == UNDEFINED:
                        break
                    value_end = pos + 12 + length
                else:
                    value_end = pos + 8 + length
                if value_end > size:
                    break
                pos = value_end
        else:
            unpack = self.implicit_header.unpack_from
            while base <= pos <= limit:
                group, element, length = unpack(window, pos - base)
                tag = (group << 16) | element
                if group == 0xFFFE or length == UNDEFINED or tag in keep or _dictionary_sq(tag) or pos + 8 + length > size:
                    break
                pos += 8 + length
        self.pos = pos

    def _step(self, levels: list[tuple[int, int, int | None]], nesting: int, top: bool) -> int:
        """One element, item or delimiter of the walk; the sequence depth after it."""
        kind, end, until = levels[-1]
        if self.pos >= end:
            if until is not None:
                raise Malformed("sequence or item not closed before the end of the data set")
            levels.pop()
            return nesting - (kind == _SEQUENCE)
        tag, vr, length = self.header()
        if kind != _DATA_SET:  # a sequence's items, or encapsulated fragments
            if tag == SEQUENCE_DELIMITER and until is not None:
                levels.pop()
                return nesting - (kind == _SEQUENCE)
            if tag != ITEM:
                raise Malformed("expected an item or a sequence delimiter")
            if length == UNDEFINED:
                levels.append((_DATA_SET, self.size, ITEM_DELIMITER))
            elif kind == _SEQUENCE:
                levels.append((_DATA_SET, self._value_end(length), None))
            else:
                self.skip(length)
            return nesting
        if tag == until:
            levels.pop()
            return nesting
        if length == UNDEFINED:
            if vr not in (b"SQ", b"UN", None, b"OB", b"OW"):
                raise Malformed("undefined length on a VR that cannot have one")
            fragments = vr in (b"OB", b"OW")
            levels.append((_FRAGMENTS if fragments else _SEQUENCE, self.size, SEQUENCE_DELIMITER))
        elif vr == b"SQ" or (vr is None and tag >> 16 != 0xFFFE and _dictionary_sq(tag)):
            levels.append((_SEQUENCE, self._value_end(length), None))
        elif top and len(levels) == 1 and tag in self.keep and length <= MAX_KEPT_VALUE:
            self.values[tag] = _text(self.read(length))
            return nesting
        else:
            self.skip(length)
            return nesting
        if levels[-1][0] != _SEQUENCE:
            return nesting
        if nesting + 1 > MAX_NESTING:
            raise Oversized(f"sequences nested deeper than {MAX_NESTING} levels")
        return nesting + 1

    def _value_end(self, length: int) -> int:
        end = self.pos + length
        if end > self.size:
            raise Malformed("a value runs past the end of the data set")
        return end


def scan_file(fh: Readable, size: int, keep: frozenset[int]) -> Scan:
    """Check a Part 10 file (preamble, ``DICM``, file meta, data set) in one pass.

    ``keep``: tags of top-level data set elements whose values (up to 256 bytes) are
    returned as text, e.g. the UIDs the spool needs.
    """
    scan = Scan()
    try:
        fh.seek(128)
        if fh.read(4) != b"DICM":
            raise Malformed("no DICM prefix")
        meta = _Walker(fh, size, explicit=True, little=True, keep=frozenset({TRANSFER_SYNTAX_TAG}))
        tag, vr, length = meta.header()
        if tag != 0x00020000 or vr != b"UL" or length != 4:
            raise Malformed("file meta without a group length")
        (group_length,) = struct.unpack("<I", meta.read(4))
        scan.dataset_offset = meta.pos + group_length
        meta.walk(min(scan.dataset_offset, size), top=True)
        scan.transfer_syntax = meta.values.get(TRANSFER_SYNTAX_TAG, "")
        if not scan.transfer_syntax:
            raise Malformed("file meta without a transfer syntax")
        if scan.transfer_syntax == DEFLATED_EXPLICIT_VR_LE:
            scan.values = _walk_deflated(fh, scan.dataset_offset, size, keep)
            return scan
        fh.seek(scan.dataset_offset)
        walker = _Walker(
            fh,
            size,
            explicit=scan.transfer_syntax != IMPLICIT_VR_LE,
            little=scan.transfer_syntax != EXPLICIT_VR_BE,
            keep=keep,
        )
        walker.walk(size, top=True)
        scan.values = walker.values
    except Malformed as exc:
        scan.problem = str(exc)
    except Oversized as exc:
        scan.problem, scan.oversized = str(exc), True
    except struct.error:
        scan.problem = "malformed element header"
    return scan


def _walk_deflated(fh: Readable, start: int, end: int, keep: frozenset[int]) -> dict[int, str]:
    """Inflate the data set from ``start`` to ``end`` of ``fh`` and walk it as Explicit
    VR Little Endian; the kept values. Raises Malformed, or Oversized past MAX_INFLATED."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    with tempfile.SpooledTemporaryFile(max_size=INFLATED_IN_MEMORY) as inflated:
        fh.seek(start)
        left, length = end - start, 0
        try:
            while left > 0 and not inflater.eof:
                chunk = fh.read(min(INFLATE_CHUNK, left))
                if not chunk:
                    raise Malformed("deflated data set runs past the end of the file")
                left -= len(chunk)
                while chunk and not inflater.eof:
                    # at most a chunk out per call, so a bomb never inflates in one go
                    out = inflater.decompress(chunk, INFLATE_CHUNK)
                    length += len(out)
                    if length > MAX_INFLATED:
                        raise Oversized(f"deflated data set inflates beyond {MAX_INFLATED >> 20} MiB")
                    inflated.write(out)
                    chunk = inflater.unconsumed_tail
        except zlib.error:
            raise Malformed("deflated data set does not inflate") from None
        if not inflater.eof:
            raise Malformed("deflated data set cut short")
        inflated.seek(0)
        walker = _Walker(inflated, length, explicit=True, little=True, keep=keep)  # type: ignore[arg-type]
        walker.walk(length, top=True)
        return walker.values
