"""Data set equality for "what was sent is what was archived" assertions.

The gateway promises to store and forward instances exactly as received: same
transfer syntax, same element values, same encapsulated fragments. Whole-file
byte equality is too strict for that promise, because every hop legitimately
rewrites the file meta group (implementation UID, source AE title) and dcmtk
drops group length elements and trailing padding. So the comparison is:

* file meta: only TransferSyntaxUID, which must be equal (no transcoding);
* data set: every element except group lengths ``(gggg,0000)`` and
  ``(FFFC,FFFC)`` trailing padding, recursively through sequences, with the
  same VR. Values are compared as their encoded bytes (both files share a
  transfer syntax, so equal values have equal bytes; this also catches
  character set or number formatting changes that a decoded comparison would
  hide), except that trailing spaces/NULs of string values are ignored:
  they are not significant and dcmtk's storescu trims them (``"OTHER  "``
  arrives as ``"OTHER"``, an all-space value as empty). Sequences are compared
  item by item, so a switch between defined and undefined length encodings
  is not a difference. Encapsulated pixel data is compared fragment by
  fragment, Basic Offset Table included; its VR may be OW on one side and OB
  on the other because dcmtk always sends encapsulated pixel data as OB, as
  the standard requires.
"""

from __future__ import annotations

import warnings
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.datadict import keyword_for_tag
from pydicom.encaps import generate_fragments
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

Source = bytes | bytearray | memoryview | Path | str

#: Dropped by dcmtk when it re-encodes a data set for the network.
TRAILING_PADDING = Tag(0xFFFC, 0xFFFC)

_MAX_SHOWN = 80

#: VRs whose values are character strings padded with a space (UI: NUL).
TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


def load(source: Source) -> Dataset:
    """Read a DICOM file from a path or from its bytes (``force`` tolerates a missing preamble)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, (bytes, bytearray, memoryview)):
            return dcmread(BytesIO(bytes(source)), force=True)
        return dcmread(Path(source), force=True)


def _short(value: object) -> str:
    """repr() cut to a readable length; bytes also show their full length."""
    text = repr(value)
    if len(text) > _MAX_SHOWN:
        text = f"{text[:_MAX_SHOWN]}..."
    if isinstance(value, (bytes, bytearray)):
        text += f" ({len(value)} bytes)"
    return text


def _name(tag: BaseTag) -> str:
    keyword = keyword_for_tag(tag) or "private/unknown"
    return f"({tag.group:04X},{tag.element:04X}) {keyword}"


def _compared_tags(ds: Dataset) -> set[BaseTag]:
    return {tag for tag in ds.keys() if tag.element != 0 and tag != TRAILING_PADDING}


def _raw_value(ds: Dataset, tag: BaseTag) -> object:
    """An element's value as read: encoded bytes unless pydicom converted it."""
    return ds.get_item(tag).value


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _comparable(raw: object, vr: str) -> object:
    """Drop trailing string padding, which is not significant and dcmtk trims."""
    if vr in TEXT_VRS and isinstance(raw, bytes):
        return raw.rstrip(b" \0")
    return raw


def _compare_element(path: str, tag: BaseTag, sent: Dataset, received: Dataset, little_endian: bool) -> None:
    where = f"{path}{_name(tag)}"
    sent_raw_elem, received_raw_elem = sent.get_item(tag), received.get_item(tag)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sent_elem, received_elem = sent[tag], received[tag]
    sent_vr, received_vr = sent_raw_elem.VR, received_raw_elem.VR
    encapsulated = sent_elem.is_undefined_length or received_elem.is_undefined_length
    if sent_vr and received_vr and sent_vr != received_vr:
        if not (encapsulated and {sent_vr, received_vr} <= {"OB", "OW"}):
            raise AssertionError(f"{where}: VR differs: sent {sent_vr}, received {received_vr}")
    if sent_elem.VR == "SQ" or received_elem.VR == "SQ":
        sent_items, received_items = list(sent_elem.value or []), list(received_elem.value or [])
        if len(sent_items) != len(received_items):
            raise AssertionError(
                f"{where}: sequence has {len(sent_items)} items sent, {len(received_items)} received"
            )
        for index, (a, b) in enumerate(zip(sent_items, received_items, strict=True)):
            _compare_datasets(f"{where}[{index}] > ", a, b, little_endian)
        return
    if encapsulated:
        _compare_encapsulated(where, sent_elem, received_elem, little_endian)
        return
    if isinstance(sent_raw_elem, RawDataElement) and isinstance(received_raw_elem, RawDataElement):
        vr = sent_elem.VR
        sent_value = _comparable(sent_raw_elem.value, vr)
        received_value = _comparable(received_raw_elem.value, vr)
    else:
        # pydicom converts a few elements while reading (e.g. PixelRepresentation,
        # to resolve US/SS): compare decoded values then.
        sent_value, received_value = sent_elem.value, received_elem.value
    if sent_value != received_value:
        raise AssertionError(
            f"{where}: value differs:\n  sent:     {_short(sent_value)}\n  received: {_short(received_value)}"
        )


def _compare_encapsulated(where: str, sent: DataElement, received: DataElement, little_endian: bool) -> None:
    if sent.is_undefined_length != received.is_undefined_length:
        raise AssertionError(
            f"{where}: encapsulated on one side only (sent undefined length: {sent.is_undefined_length}, "
            f"received: {received.is_undefined_length})"
        )
    endianness = "<" if little_endian else ">"
    sent_fragments = list(generate_fragments(sent.value, endianness=endianness))
    received_fragments = list(generate_fragments(received.value, endianness=endianness))
    if len(sent_fragments) != len(received_fragments):
        raise AssertionError(
            f"{where}: {len(sent_fragments)} items sent (Basic Offset Table included), "
            f"{len(received_fragments)} received"
        )
    for index, (a, b) in enumerate(zip(sent_fragments, received_fragments, strict=True)):
        if a != b:
            label = "Basic Offset Table" if index == 0 else f"fragment {index}"
            raise AssertionError(f"{where}: {label} differs:\n  sent:     {_short(a)}\n  received: {_short(b)}")


def _compare_datasets(path: str, sent: Dataset, received: Dataset, little_endian: bool) -> None:
    sent_tags, received_tags = _compared_tags(sent), _compared_tags(received)
    missing, extra = sent_tags - received_tags, received_tags - sent_tags
    if missing or extra:
        details = [f"missing {_name(t)} = {_short(_raw_value(sent, t))}" for t in sorted(missing)]
        details += [f"unexpected {_name(t)} = {_short(_raw_value(received, t))}" for t in sorted(extra)]
        raise AssertionError(f"{path or 'data set'}: elements differ: " + "; ".join(details))
    for tag in sorted(sent_tags):
        _compare_element(path, tag, sent, received, little_endian)


def assert_same_dataset(sent: Source, received: Source) -> None:
    """Assert that ``received`` holds the same data set, in the same transfer syntax, as ``sent``.

    Both may be file paths or file bytes. Raises AssertionError naming the
    first difference: the transfer syntax, or the element (tag, keyword, both
    values truncated) with its path through any enclosing sequences.
    """
    sent_ds, received_ds = load(sent), load(received)
    sent_syntax, received_syntax = _transfer_syntax(sent_ds), _transfer_syntax(received_ds)
    if sent_syntax is None or received_syntax is None:
        raise AssertionError(
            f"cannot check the transfer syntax: sent {sent_syntax!r}, received {received_syntax!r} "
            "(a data set without file meta?)"
        )
    if sent_syntax != received_syntax:
        raise AssertionError(
            f"transfer syntax changed: sent {sent_syntax} ({sent_syntax.name}), "
            f"received {received_syntax} ({received_syntax.name})"
        )
    _compare_datasets("", sent_ds, received_ds, sent_syntax.is_little_endian)
