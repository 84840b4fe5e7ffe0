"""The metadata the embedded archive answers for a stored file: every attribute as
DICOM JSON, bulk data as a ``BulkDataURI`` relative to the instance.

The writer process builds it as it stores each instance, from the header it indexes
(`kept_metadata`), and keeps its text in the index, so a viewer's first series
metadata request is a query, not a read of every file. Files indexed before that, or
whose text is too long to keep, are read here when asked (`file_metadata`); a test
holds the two ways equal on every corpus file.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.filereader import read_dataset
from pydicom.valuerep import AMBIGUOUS_VR, VR

from gateway.codecs.syntaxes import DEFLATED_EXPLICIT_VR_LE as DEFLATED
from gateway.upstream.raw_json import element_json

log = logging.getLogger("gateway.upstream")

SPECIFIC_CHARACTER_SET = 0x00080005
# Binary values above this many bytes, and pixel data always, are bulk data: metadata
# names them with a BulkDataURI instead of carrying them.
BULK_DATA_THRESHOLD = 1024
BULK_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
PIXEL_DATA = 0x7FE00010
AVAILABLE_TRANSFER_SYNTAX = "00083002"


def converted(ds: pydicom.Dataset, raw: pydicom.DataElement | RawDataElement) -> pydicom.DataElement:
    """``ds[raw.tag]``, for less: ``raw`` (one of ``ds.elements()``) converted once
    from its raw form, where indexing the data set looks up its character set for
    every element and files the converted element back, checking the private block
    of every private one. A scanner's CT carries some 250 elements, most of them
    private: its header's metadata 30 -> 21 ms. Sequences, values read later
    (``defer_size``) and the VRs only the data set can settle (US or SS, OB or OW)
    take the data set's own way, as do elements of a data set that does not know its
    character set (an item, which inherits its parent's) and Specific Character Set
    itself."""
    encoding = ds.original_character_set
    if (
        not isinstance(raw, RawDataElement)
        or (raw.value is None and raw.length != 0)
        or not encoding
        or raw.tag == SPECIFIC_CHARACTER_SET
    ):
        return ds[raw.tag]
    elem = convert_raw_data_element(raw, encoding=encoding, ds=ds)
    return ds[raw.tag] if elem.VR == VR.SQ or elem.VR in AMBIGUOUS_VR else elem


def is_bulk(ds: pydicom.Dataset, raw: DataElement | RawDataElement) -> bool:
    """Whether an element is bulk data, decided before its value is read."""
    if raw.tag in PIXEL_DATA_TAGS:
        return True
    if isinstance(raw, RawDataElement):
        length = raw.length
    else:
        length = len(raw.value) if isinstance(raw.value, (bytes, bytearray)) else 0
    return length > BULK_DATA_THRESHOLD and bulk_vr(ds, raw) in BULK_VRS


def bulk_vr(ds: pydicom.Dataset, raw: DataElement | RawDataElement) -> str:
    """A bulk element's VR without reading its value (implicit VR: from the dictionary,
    Pixel Data's "OB or OW" settled by Bits Allocated as PS3.5 A.1 does)."""
    vr = raw.VR
    if vr is None:
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return "UN"
    if str(vr) == "OB or OW":
        return "OW" if raw.tag == PIXEL_DATA and int(ds.get("BitsAllocated") or 8) > 8 else "OB"
    return str(vr).split(" or ")[0]


def file_metadata(path: Path) -> dict[str, Any]:
    """A stored file's metadata (`metadata_json`) with its stored syntax as Available
    Transfer Syntax UID (0008,3002): a viewer tells a video (OHIF's video viewport
    takes an H.264 ultrasound clip by it) or a compressed instance from its metadata
    alone."""
    ds = pydicom.dcmread(path, defer_size=BULK_DATA_THRESHOLD)
    return _with_syntax(metadata_json(ds), ds)


def _with_syntax(obj: dict[str, Any], ds: pydicom.Dataset) -> dict[str, Any]:
    """``obj`` with the syntax ``ds`` was stored in, in its place in tag order."""
    stored = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if stored:
        obj = dict(sorted({**obj, AVAILABLE_TRANSFER_SYNTAX: {"vr": "UI", "Value": [stored]}}.items()))
    return obj


def metadata_text(obj: Mapping[str, Any]) -> str:
    """An instance's metadata as the facade's answers serialise it (``json.dumps``
    with its default separators), so a kept text goes into an answer as it is."""
    return json.dumps(obj, ensure_ascii=False)


def metadata_json(ds: pydicom.Dataset, prefix: str = "bulkdata", encoded: dict[int, Any] | None = None) -> dict[str, Any]:
    """``ds`` as DICOM JSON with every attribute except bulk data, which gets a
    ``BulkDataURI`` relative to the instance: ``bulkdata/<tag>`` at the top level,
    ``bulkdata/<sequence tag>/<item index>/<tag>`` within sequences (for the facade to
    resolve). Values stay on disk until needed (read with ``defer_size``), so pixel
    data is never read; an element pydicom cannot encode is left out, as in the index.
    ``encoded``: what `element_json` gave for top-level elements already, by tag.
    """
    out: dict[str, Any] = {}
    for tag in ds.keys():
        key = f"{int(tag):08X}"
        try:
            raw = ds.get_item(tag, keep_deferred=True)
            if raw is None:
                continue
            if is_bulk(ds, raw):
                out[key] = {"vr": bulk_vr(ds, raw), "BulkDataURI": f"{prefix}/{key}"}
                continue
            if isinstance(raw, RawDataElement):
                plain = encoded[tag] if encoded is not None and tag in encoded else element_json(raw)
                if plain is not None:
                    out[key] = plain
                    continue
            elem = converted(ds, raw)
            if elem.VR == "SQ":
                items = [metadata_json(item, f"{prefix}/{key}/{i}") for i, item in enumerate(elem.value)]
                out[key] = {"vr": "SQ", "Value": items} if items else {"vr": "SQ"}
            else:
                out[key] = elem.to_json_dict(None, BULK_DATA_THRESHOLD)
        except Exception:  # noqa: BLE001 - one bad element must not lose the instance
            log.debug("metadata: element %s left out", key)
    return out


# The longest metadata text the index keeps; a longer one (an RT structure set's
# contours, a large SR) is read from its file when asked.
KEPT_METADATA_MAX = 4 << 20


def kept_metadata(head: pydicom.Dataset, fh: BinaryIO, encoded: dict[int, Any] | None = None) -> str | None:
    """The text of a stored file's metadata for the index: what `file_metadata` and
    `metadata_text` give, from the header the index row was made of (``head``, read
    from ``fh`` with ``stop_before_pixels``, which leaves ``fh`` at the pixel data)
    completed with the elements from there on, which it takes into ``head``, and the
    elements' JSON the index row's pass made (``encoded``, by tag). Reading the file
    again whole, and encoding its elements again, cost the writer as much as the
    rest of its work. None when the text is longer than KEPT_METADATA_MAX or the
    file cannot be read so (it is then read when asked, and fails as it fails now)."""
    try:
        text = metadata_text(_completed(head, fh, encoded or {}))
    except Exception:  # noqa: BLE001 - the index row stands without it
        log.debug("metadata of %s not kept in the index", Path(fh.name).name)  # type: ignore[attr-defined]
        return None
    return text if len(text) <= KEPT_METADATA_MAX else None


def _completed(head: pydicom.Dataset, fh: BinaryIO, encoded: dict[int, Any]) -> dict[str, Any]:
    """`file_metadata` of the file ``head`` was read from, taking the elements after
    it into ``head``. A deflated data set (``fh`` is not where it ends), a private
    element after the pixel data, or one read later that is not bulk data (each
    would need the data set's own reading) reads the file again whole."""
    path = Path(fh.name)  # type: ignore[attr-defined]
    if str(head.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        return file_metadata(path)
    if fh.tell() < os.fstat(fh.fileno()).st_size:
        implicit, little = head.original_encoding
        tail = read_dataset(fh, bool(implicit), bool(little), defer_size=BULK_DATA_THRESHOLD)
        raws = [tail.get_item(tag, keep_deferred=True) for tag in tail.keys()]
        for raw in raws:
            if raw.tag.is_private or (isinstance(raw, RawDataElement) and raw.value is None and raw.length and not is_bulk(head, raw)):
                return file_metadata(path)
        for raw in raws:
            head[raw.tag] = raw
    return _with_syntax(metadata_json(head, encoded=encoded), head)
