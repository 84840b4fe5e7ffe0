"""Instances built from a STOW-RS request of metadata and bulk data (PS3.18 10.5.1.2).

Besides Part 10 files, STOW-RS takes an instance as DICOM JSON metadata whose large
values are ``BulkDataURI`` references to other parts of the same request, matched by
their ``Content-Location``: how a script turns a PDF report, a JPEG photograph or a
video into a DICOM instance without a DICOM toolkit (dcm4che's ``stowrs -t json``,
Google's "metadata and JPEG" example). The gateway builds the Part 10 file here and
hands it to the same ingest as any other instance, so it gets the same guarantee.

A compressed bulk data part becomes encapsulated Pixel Data in the transfer syntax its
media type (or its ``transfer-syntax`` parameter) names; ``application/octet-stream``
becomes native Pixel Data, or the value of any other bulk attribute as it is. Large
parts stay in their spill files and are copied into the spool record in chunks, never
held whole. What cannot be built fails on its own with a PS3.18 failure reason.
"""

from __future__ import annotations

import io
import json
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydicom import Dataset
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.dicomweb.mediatypes import OCTET_STREAM, frame_syntaxes, media_type, transfer_syntax_param
from gateway.part10 import LONG_VRS, file_meta_header
from gateway.uids import is_valid_uid

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", EXPLICIT_VR_LITTLE_ENDIAN})
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
# PS3.18 Table 8.7.3-4: the transfer syntaxes a video bulk data part may be in, the
# first taken when the part names none (images: `frame_syntaxes`, the frames' table).
VIDEO_SYNTAXES: dict[str, tuple[str, ...]] = {
    "video/mpeg2": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"),
    "video/mpeg": ("1.2.840.10008.1.2.4.100", "1.2.840.10008.1.2.4.101"),
    "video/mp4": (
        "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103", "1.2.840.10008.1.2.4.104",
        "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106",
    ),
    "video/h265": ("1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108"),
}
PIXEL_DATA = "7FE00010"
# The Image Pixel attributes a JPEG's own header tells, filled in when the metadata
# leaves them out (Google's "metadata and JPEG" example sends none of them).
_JPEG_PIXEL_KEYWORDS = (
    "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
)
_ITEM = 0xE000FFFE  # (FFFE,E000) read as one little endian 32-bit value
_SEQUENCE_DELIMITER = 0xE0DDFFFE
_MAX_FRAGMENT = 0xFFFFFFFE
_COPY_CHUNK = 1 << 20
_TAG_KEY = re.compile(r"^[0-9A-Fa-f]{8}$")
_TAG_IN_ERROR = re.compile(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)")

# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3.
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SYNTAX_NOT_SUPPORTED = 0xC122


class NotBuilt(ValueError):
    """An instance that cannot be built from its metadata: a PS3.18 failure reason and
    words for the log (keywords and UIDs, never values)."""

    def __init__(self, reason: int, comment: str, uids: tuple[str, str, str, str] = ("", "", "", "")) -> None:
        super().__init__(comment)
        self.reason = reason
        self.uids = uids


@dataclass(frozen=True)
class BulkPart:
    """A bulk data part of the request: its media type, the transfer syntax it names,
    and its content in memory or in a spill file."""

    media_type: str
    transfer_syntax: str | None
    data: bytes | None
    path: Path | None
    length: int

    @classmethod
    def of(cls, content_type: str, data: bytes | None, path: Path | None, length: int) -> BulkPart:
        return cls(media_type(content_type) or OCTET_STREAM, transfer_syntax_param(content_type), data, path, length)

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        with open(self.path, "rb") as fh:
            while chunk := fh.read(_COPY_CHUNK):
                yield chunk

    def head(self, size: int) -> bytes:
        if self.data is not None:
            return self.data[:size]
        assert self.path is not None
        with open(self.path, "rb") as fh:
            return fh.read(size)

    def read(self) -> bytes:
        return b"".join(self.chunks())


@dataclass(frozen=True)
class _Streamed:
    """A top-level bulk value written from its part: plain, or encapsulated as one fragment."""

    tag: int
    vr: str
    part: BulkPart
    encapsulated: bool


@dataclass
class BuiltInstance:
    """A Part 10 file ready to write: its UIDs, and its pieces in order (encoded bytes,
    and bulk values copied from their parts)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    pieces: list[bytes | _Streamed]

    def write(self, sink: Callable[[bytes], None]) -> None:
        """Write the file, from ``DICM`` on (the spool record's preamble replaces the
        128 bytes before it)."""
        for piece in self.pieces:
            if isinstance(piece, bytes):
                sink(piece)
                continue
            pad = piece.part.length % 2
            if piece.encapsulated:
                # Undefined length, an empty Basic Offset Table, one fragment, the delimiter.
                sink(struct.pack("<I2sHI", piece.tag, b"OB", 0, 0xFFFFFFFF) + struct.pack("<II", _ITEM, 0))
                sink(struct.pack("<II", _ITEM, piece.part.length + pad))
            else:
                sink(struct.pack("<I2sHI", piece.tag, piece.vr.encode(), 0, piece.part.length + pad))
            for chunk in piece.part.chunks():
                sink(chunk)
            if pad:
                sink(b"\x00")
            if piece.encapsulated:
                sink(struct.pack("<II", _SEQUENCE_DELIMITER, 0))


def metadata_objects(data: bytes) -> list[dict[str, Any]]:
    """The instances of one ``application/dicom+json`` part: a DICOM JSON array (one
    object per instance) or a single object. Raises ValueError when it is neither."""
    try:
        parsed = json.loads(data)
    except RecursionError as exc:
        raise ValueError("the metadata is nested too deeply") from exc
    objects = parsed if isinstance(parsed, list) else [parsed]
    if not objects or not all(isinstance(o, dict) for o in objects):
        raise ValueError("the metadata part is not a DICOM JSON object or array of objects")
    return objects


def _uid_value(obj: Mapping[str, Any], tag: str) -> str:
    element = obj.get(tag)
    value = element.get("Value") if isinstance(element, dict) else None
    uid = value[0] if isinstance(value, list) and value else ""
    return uid if isinstance(uid, str) else ""


def _uids(obj: Mapping[str, Any]) -> tuple[str, str, str, str]:
    return (_uid_value(obj, "00080016"), _uid_value(obj, "00080018"), _uid_value(obj, "0020000D"), _uid_value(obj, "0020000E"))


def _resolve(uri: str, bulk: Mapping[str, BulkPart], uids: tuple[str, str, str, str]) -> BulkPart:
    part = bulk.get(uri.strip())
    if part is None:
        raise NotBuilt(CANNOT_UNDERSTAND, f"no part of the request has Content-Location {uri[:80]!r}", uids)
    return part


def _pixel_syntax(part: BulkPart, declared: str | None, uids: tuple[str, str, str, str]) -> str:
    """The transfer syntax of a Pixel Data part: what its Content-Type names, else what
    the metadata's (0002,0010) names, else its media type's first."""
    if part.media_type == OCTET_STREAM:
        if part.transfer_syntax and part.transfer_syntax not in NATIVE_SYNTAXES:
            raise NotBuilt(SYNTAX_NOT_SUPPORTED, f"native Pixel Data labelled {part.transfer_syntax}", uids)
        return EXPLICIT_VR_LITTLE_ENDIAN
    allowed = VIDEO_SYNTAXES.get(part.media_type) or frame_syntaxes(part.media_type)
    if not allowed:
        raise NotBuilt(SYNTAX_NOT_SUPPORTED, f"Pixel Data of media type {part.media_type}", uids)
    for candidate in (part.transfer_syntax, declared):
        if candidate:
            if candidate not in allowed:
                raise NotBuilt(SYNTAX_NOT_SUPPORTED, f"a {part.media_type} part cannot hold {candidate}", uids)
            return candidate
    return allowed[0]


def _fill_from_jpeg(ds: Dataset, part: BulkPart, uids: tuple[str, str, str, str]) -> None:
    """Image Pixel attributes the metadata left out, from the JPEG's frame header; and
    those it gave checked against it (a viewer would draw garbage otherwise)."""
    try:
        with Image.open(io.BytesIO(part.head(1 << 20))) as image:
            columns, rows = image.size
            mode = image.mode
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise NotBuilt(CANNOT_UNDERSTAND, f"the image/jpeg part is not a JPEG image: {exc}", uids) from exc
    if mode not in ("L", "RGB"):
        raise NotBuilt(SYNTAX_NOT_SUPPORTED, f"JPEG of colour mode {mode}", uids)
    samples = 1 if mode == "L" else 3
    known = {
        "Rows": rows, "Columns": columns, "SamplesPerPixel": samples,
        "PhotometricInterpretation": "MONOCHROME2" if samples == 1 else "YBR_FULL_422",
        "BitsAllocated": 8, "BitsStored": 8, "HighBit": 7, "PixelRepresentation": 0,
    }
    for keyword in _JPEG_PIXEL_KEYWORDS:
        given = ds.get(keyword)
        if given is None or given == "":
            setattr(ds, keyword, known[keyword])
        elif keyword in ("Rows", "Columns", "SamplesPerPixel") and int(given) != known[keyword]:
            raise NotBuilt(DATA_SET_MISMATCH, f"{keyword} {given} but the JPEG has {known[keyword]}", uids)
    if samples == 3 and "PlanarConfiguration" not in ds:
        ds.PlanarConfiguration = 0


def _frames(ds: Dataset, uids: tuple[str, str, str, str]) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError) as exc:
        raise NotBuilt(DATA_SET_MISMATCH, "NumberOfFrames is not a number", uids) from exc


def _check_native_length(ds: Dataset, part: BulkPart, uids: tuple[str, str, str, str]) -> None:
    """Native Pixel Data must hold exactly the frames its Image Pixel attributes describe."""
    frames = _frames(ds, uids)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.SamplesPerPixel), int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotBuilt(DATA_SET_MISMATCH, "native Pixel Data without Rows, Columns, SamplesPerPixel and BitsAllocated", uids) from exc
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if part.length not in (expected, expected + expected % 2):
        raise NotBuilt(DATA_SET_MISMATCH, f"Pixel Data of {part.length} bytes where the image needs {expected}", uids)


def _encode(ds: Dataset, encoding: Any) -> bytes:
    """Explicit VR little endian elements; text in ``encoding`` (the whole data set's
    Specific Character Set, which a slice of it may not hold)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds, parent_encoding=encoding)
    return fp.getvalue()


def _defined_vrs(tag: int) -> frozenset[str] | None:
    """The VRs PS3.6 allows a public attribute (``US or SS``: either); None for private
    and unknown ones, whose VR is the sender's to say."""
    if (tag >> 16) % 2:
        return None
    try:
        return frozenset(dictionary_VR(tag).split(" or "))
    except KeyError:
        return None


def _check_vrs(elements: Iterator[tuple[int, str]], uids: tuple[str, str, str, str]) -> None:
    """Explicit VR encoding writes the VR each element was given, and the metadata may
    give a public attribute one PS3.5 7.1.2 forbids (BitsAllocated as PN). Such a file
    breaks whoever reads it later (Orthanc then fails every search of its study), so
    the instance fails here; UN stays allowed, as for a value whose VR is unknown."""
    for tag, vr in elements:
        allowed = _defined_vrs(tag)
        if allowed is not None and vr != "UN" and vr not in allowed:
            name = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            raise NotBuilt(
                CANNOT_UNDERSTAND, f"the metadata gives {name} the VR {vr}; PS3.6 defines {' or '.join(sorted(allowed))}", uids
            )


def _vrs_of(ds: Dataset) -> Iterator[tuple[int, str]]:
    """(tag, VR) of every element of ``ds``, those in its sequences' items too."""
    for element in ds:
        yield int(element.tag), element.VR
        if element.VR == "SQ":
            for item in element.value or ():
                yield from _vrs_of(item)


def build_instance(obj: Mapping[str, Any], bulk: Mapping[str, BulkPart]) -> BuiltInstance:
    """The Part 10 file one metadata object describes, its bulk data taken from
    ``bulk`` (parts by Content-Location). Raises NotBuilt."""
    uids = _uids(obj)
    if not all(is_valid_uid(uid) for uid in uids[:2]):
        raise NotBuilt(DATA_SET_MISMATCH, "the metadata lacks a valid SOPClassUID or SOPInstanceUID", uids)
    top: dict[int, tuple[str, BulkPart]] = {}
    rest: dict[str, Any] = {}
    for key, element in obj.items():
        if not _TAG_KEY.match(key):
            raise NotBuilt(CANNOT_UNDERSTAND, f"the metadata names an attribute {key[:20]!r}, not a tag", uids)
        if isinstance(element, dict) and isinstance(element.get("BulkDataURI"), str) and element.get("vr", "").encode() in LONG_VRS:
            top[int(key, 16)] = (element["vr"], _resolve(element["BulkDataURI"], bulk, uids))
        else:
            rest[key] = element
    try:
        ds = Dataset.from_json(rest, bulk_data_uri_handler=lambda _tag, _vr, uri: _resolve(uri, bulk, uids).read())
    except NotBuilt:
        raise
    except RecursionError as exc:
        raise NotBuilt(CANNOT_UNDERSTAND, "the metadata's sequences are nested too deeply", uids) from exc
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on bad JSON
        raise NotBuilt(CANNOT_UNDERSTAND, f"the metadata is not valid DICOM JSON: {type(exc).__name__}", uids) from exc
    _check_vrs(_vrs_of(ds), uids)
    _check_vrs(((tag, vr) for tag, (vr, _) in top.items()), uids)
    declared = str(ds.get((0x0002, 0x0010)).value) if (0x0002, 0x0010) in ds else None
    for tag in [t for t in ds.keys() if t.group == 0x0002]:
        del ds[tag]  # the File Meta group is the gateway's to write
    syntax = EXPLICIT_VR_LITTLE_ENDIAN
    pixels = top.get(int(PIXEL_DATA, 16))
    if pixels is not None:
        part = pixels[1]
        syntax = _pixel_syntax(part, declared, uids)
        if syntax == EXPLICIT_VR_LITTLE_ENDIAN:
            _check_native_length(ds, part, uids)
        else:
            if _frames(ds, uids) > 1 and part.media_type not in VIDEO_SYNTAXES:
                raise NotBuilt(SYNTAX_NOT_SUPPORTED, "a multi-frame compressed image in one bulk data part", uids)
            if part.length + part.length % 2 > _MAX_FRAGMENT:
                raise NotBuilt(CANNOT_UNDERSTAND, "a compressed Pixel Data part larger than one fragment can hold", uids)
            if part.media_type == "image/jpeg" and syntax == JPEG_BASELINE:
                _fill_from_jpeg(ds, part, uids)
    elif declared and declared not in NATIVE_SYNTAXES and "PixelData" in ds:
        raise NotBuilt(SYNTAX_NOT_SUPPORTED, f"inline Pixel Data declared as {declared}", uids)
    if not json.dumps(obj, ensure_ascii=False).isascii():
        # DICOM JSON is Unicode whatever (0008,0005) says; UTF-8 holds every value.
        ds.SpecificCharacterSet = "ISO_IR 192"
    try:
        pieces: list[bytes | _Streamed] = [file_meta_header(uids[0], uids[1], syntax, "")[128:]]
        held = Dataset()
        encoding = ds.get("SpecificCharacterSet", default_encoding)
        for number in sorted({int(t) for t in ds.keys()} | set(top)):
            if number in top:
                if len(held):
                    pieces.append(_encode(held, encoding))
                    held = Dataset()
                vr, part = top[number]
                pieces.append(_Streamed(_wire_tag(number), vr, part, number == int(PIXEL_DATA, 16) and syntax not in NATIVE_SYNTAXES))
            else:
                held.add(ds[number])
        if len(held):
            pieces.append(_encode(held, encoding))
    except NotBuilt:
        raise
    except Exception as exc:  # noqa: BLE001 - a value pydicom cannot encode for its VR
        where = _TAG_IN_ERROR.search(str(exc))  # the tag only: the message may quote the value
        raise NotBuilt(
            CANNOT_UNDERSTAND, f"the metadata cannot be encoded: {type(exc).__name__}{' at ' + where.group(0) if where else ''}", uids
        ) from exc
    return BuiltInstance(*uids, syntax, pieces)


def _wire_tag(tag: int) -> int:
    """A tag as the 32-bit little endian value of its group then element on the wire."""
    return ((tag & 0xFFFF) << 16) | (tag >> 16)
