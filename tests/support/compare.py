"""Data set equality for "what was sent is what was archived" assertions.

The gateway promises to store and forward instances exactly as received: same
transfer syntax, same element values, same encapsulated fragments. Whole-file
byte equality is too strict for that promise, because every hop legitimately
rewrites the file meta group (implementation UID, source AE title) and dcmtk
drops group length elements and trailing padding. So the comparison is:

* file meta: only TransferSyntaxUID, which must be equal (no transcoding);
* data set: every element except group lengths ``(gggg,0000)`` and
  ``(FFFC,FFFC)`` trailing padding, recursively through sequences. Values
  are compared as their encoded bytes (both files share a transfer syntax, so
  equal values have equal bytes; this also catches changed padding or
  character set handling that a decoded comparison would hide). Sequences
  are compared item by item, so a switch between defined and undefined
  length encodings is not a difference. Encapsulated pixel data is compared
  fragment by fragment, Basic Offset Table included.
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


def load(source: Source) -> Dataset:
    """Read a DICOM file from a path or from bytes; raises on unreadable input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(source, (bytes, bytearray, memoryview)):
            return dcmread(BytesIO(bytes(source)), force=True)
        return dcmread(Path(source), force=True)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else f"{text[:_MAX_SHOWN]}... ({len(text)} chars)"


def _name(tag: BaseTag) -> str:
    keyword = keyword_for_tag(tag) or "private/unknown"
    return f"({tag.group:04X},{tag.element:04X}) {keyword}"


def _compared_tags(ds: Dataset) -> set[BaseTag]:
    return {tag for tag in ds.keys() if tag.element != 0 and tag != TRAILING_PADDING}


def _raw_value(ds: Dataset, tag: BaseTag) -> tuple[str | None, object]:
    """(VR, encoded value) of an element as read, before pydicom converts it."""
    item = ds.get_item(tag)
    if isinstance(item, RawDataElement):
        return item.VR, item.value
    assert isinstance(item, DataElement)
    return item.VR, item.value


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _is_little_endian(ds: Dataset) -> bool:
    syntax = _transfer_syntax(ds)
    return syntax is None or syntax.is_little_endian


def _compare_element(path: str, tag: BaseTag, sent: Dataset, received: Dataset, little_endian: bool) -> None:
    where = f"{path}{_name(tag)}"
    sent_vr, sent_raw = _raw_value(sent, tag)
    received_vr, received_raw = _raw_value(received, tag)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sent_elem, received_elem = sent[tag], received[tag]
    if sent_vr and received_vr and sent_vr != received_vr:
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
    if sent_elem.is_undefined_length or received_elem.is_undefined_length:
        _compare_encapsulated(where, sent_elem, received_elem, little_endian)
        return
    if sent_raw != received_raw:
        raise AssertionError(
            f"{where}: value differs:\n  sent:     {_short(sent_raw)}\n  received: {_short(received_raw)}"
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
        details = [f"missing {_name(t)} = {_short(_raw_value(sent, t)[1])}" for t in sorted(missing)]
        details += [f"unexpected {_name(t)} = {_short(_raw_value(received, t)[1])}" for t in sorted(extra)]
        raise AssertionError(f"{path or 'data set'}: elements differ: " + "; ".join(details))
    for tag in sorted(sent_tags):
        _compare_element(path, tag, sent, received, little_endian)


def assert_same_dataset(sent: Source, received: Source, check_transfer_syntax: bool = True) -> None:
    """Assert that ``received`` holds the same data set as ``sent``.

    Both may be file paths or file bytes (with or without preamble). Raises
    AssertionError naming the first differing element (tag, keyword, both
    values truncated). ``check_transfer_syntax=False`` is only for hops that
    are allowed to transcode (and then values may legitimately differ).
    """
    sent_ds, received_ds = load(sent), load(received)
    if check_transfer_syntax:
        sent_syntax, received_syntax = _transfer_syntax(sent_ds), _transfer_syntax(received_ds)
        if sent_syntax is None or received_syntax is None:
            raise AssertionError(
                f"cannot check the transfer syntax: sent {sent_syntax!r}, received {received_syntax!r} "
                "(a file without file meta?)"
            )
        if sent_syntax != received_syntax:
            raise AssertionError(
                f"transfer syntax changed: sent {sent_syntax} ({sent_syntax.name}), "
                f"received {received_syntax} ({received_syntax.name})"
            )
    _compare_datasets("", sent_ds, received_ds, _is_little_endian(sent_ds))
