"""The frames retrieve path: a Part 10 instance rebuilt from its image set's metadata
(GetImageSetMetadata) and its frames (GetImageFrame), instead of GetDICOMInstance.

GetImageFrame's quota is twenty times GetDICOMInstance's and one metadata document
serves every instance of an image set, so a large move is not bound to 50
instances/s. The document holds each attribute by keyword (private ones by tag,
their VR in ``DICOMVRs``), the patient and study attributes once, the series'
once per series; values are JSON (numbers, strings, lists, sequences as lists of
objects). What it does not carry, the rebuilt instance lacks: binary attributes
other than the pixel data (OB/OW/OF/OD/OL/OV/UN values: overlays, icon pixel data,
waveform data, encapsulated documents), private attributes inside sequences (their
VR is not given), and the File Meta Information beyond the SOP class, instance and
transfer syntax (our own implementation UID replaces the source's). So instances
without frames are always read with GetDICOMInstance.

The pixel data is the frames as stored (``StoredTransferSyntaxUID``: HTJ2K for
lossless data by default), encapsulated; the retrieval engine decodes it where the
receiver needs another syntax, as it does for what GetDICOMInstance sends as stored.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

K = TypeVar("K")
V = TypeVar("V")

_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "IS", "DS", "AT"})  # AT: the tag as a number
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"})


class Unrebuildable(Exception):
    """The metadata cannot be turned into this instance; GetDICOMInstance can."""


def instance_entry(document: dict[str, Any], series_uid: str, sop_instance_uid: str) -> dict[str, Any] | None:
    """The instance's entry in an image set's metadata, or None when it is not there."""
    series = ((document.get("Study") or {}).get("Series") or {}).get(series_uid) or {}
    entry = (series.get("Instances") or {}).get(sop_instance_uid)
    return entry if isinstance(entry, dict) else None


def frames_size(entry: dict[str, Any]) -> int:
    """The bytes of an instance's frames as stored, from their ``FrameSizeInBytes``
    (a missing or unreadable size counts as none)."""
    total = 0
    for frame in entry.get("ImageFrames") or []:
        size = frame.get("FrameSizeInBytes") if isinstance(frame, dict) else None
        if isinstance(size, int) and size > 0:
            total += size
    return total


def _tag_and_vr(key: str, vrs: dict[str, str]) -> tuple[int, str] | None:
    """The tag and VR of a metadata key: a keyword, or eight hex digits (private and
    repeating-group attributes) with its VR from ``DICOMVRs`` or the dictionary."""
    tag: int | None
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        tag = int(key, 16)
        if key in vrs:
            return tag, vrs[key]
    else:
        tag = tag_for_keyword(key) if key else None
    if tag is None:
        return None
    try:
        return tag, dictionary_VR(tag)
    except KeyError:
        return None


def _value(vr: str, raw: Any) -> Any:
    """A JSON value as pydicom takes it for ``vr`` (an empty one as no value)."""
    if raw is None or raw == "" or raw == []:
        return None
    if isinstance(raw, list):
        return [_item(vr, item) for item in raw]
    return _item(vr, raw)


def _item(vr: str, raw: Any) -> Any:
    """One value of a multi-valued attribute: an empty one stays empty text."""
    if vr in _NUMERIC_VRS or vr == "US or SS":
        return raw  # a number, or text pydicom parses
    return "" if raw is None else str(raw)


def dataset_of(attributes: dict[str, Any], vrs: dict[str, str] | None = None, *, strict: bool = True) -> Dataset:
    """A data set from a metadata ``DICOM`` object (sequences recursively). A value
    pydicom cannot take for its VR raises Unrebuildable (``strict``) or is left out."""
    ds = Dataset()
    for key, raw in attributes.items():
        found = _tag_and_vr(key, vrs or {})
        if found is None:
            continue
        tag, vr = found
        try:
            if vr == "SQ":
                items = raw if isinstance(raw, list) else []
                ds.add(DataElement(tag, "SQ", DicomSequence([dataset_of(i, strict=strict) for i in items if isinstance(i, dict)])))
            elif vr not in _BINARY_VRS:
                ds.add(DataElement(tag, vr, _value(vr, raw)))
        except (ValueError, TypeError, OverflowError) as exc:
            if strict:
                raise Unrebuildable(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) not valid for VR {vr}: {type(exc).__name__}") from None
    return ds


def rebuild(document: dict[str, Any], series_uid: str, sop_instance_uid: str, frames: Sequence[bytes]) -> tuple[bytes, str]:
    """The instance as a Part 10 file in its stored syntax, and that syntax (blocking)."""
    entry = instance_entry(document, series_uid, sop_instance_uid)
    if entry is None:
        raise Unrebuildable("instance not in the image set metadata")
    syntax = UID(str(entry.get("StoredTransferSyntaxUID") or ""))
    if not syntax.is_transfer_syntax:
        raise Unrebuildable(f"unknown stored transfer syntax {syntax!r}")
    study = document.get("Study") or {}
    series = (study.get("Series") or {}).get(series_uid) or {}
    ds = Dataset()
    for level in ((document.get("Patient") or {}).get("DICOM"), study.get("DICOM"), series.get("DICOM")):
        if isinstance(level, dict):
            ds.update(dataset_of(level))
    ds.update(dataset_of(entry.get("DICOM") or {}, entry.get("DICOMVRs") or {}))
    if syntax.is_encapsulated:
        ds.add(DataElement(0x7FE00010, "OB", encapsulate(list(frames))))
    else:
        pixels = b"".join(frames)
        bits = int(ds.get("BitsAllocated", 16) or 16)
        ds.add(DataElement(0x7FE00010, "OW" if bits > 8 else "OB", pixels + b"\0" * (len(pixels) % 2)))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Unrebuildable(f"metadata not writable as DICOM: {exc}") from None
    return buffer.getvalue(), str(syntax)


def search_objects(document: dict[str, Any], series_uid: str | None, *, instances: bool) -> list[dict[str, Any]]:
    """An image set's series (or instances), as DICOM JSON search answers holding the
    patient, study and series attributes (and the instance's), from its metadata; only
    those of ``series_uid`` when given."""
    study = document.get("Study") or {}
    above = Dataset()
    for level in ((document.get("Patient") or {}).get("DICOM"), study.get("DICOM")):
        if isinstance(level, dict):
            above.update(dataset_of(level, strict=False))
    objects: list[dict[str, Any]] = []
    for uid, series in (study.get("Series") or {}).items():
        if series_uid is not None and uid != series_uid or not isinstance(series, dict):
            continue
        at_series = Dataset()
        at_series.update(above)
        at_series.update(dataset_of(series.get("DICOM") or {}, strict=False))
        if not instances:
            at_series.NumberOfSeriesRelatedInstances = len(series.get("Instances") or {})
            objects.append(at_series.to_json_dict(suppress_invalid_tags=True))
            continue
        for entry in (series.get("Instances") or {}).values():
            ds = Dataset()
            ds.update(at_series)
            ds.update(dataset_of(entry.get("DICOM") or {}, entry.get("DICOMVRs") or {}, strict=False))
            objects.append(ds.to_json_dict(suppress_invalid_tags=True))
    return objects


class TtlCache(Generic[K, V]):
    """``load(key)`` remembered for ``ttl`` seconds, at most ``size`` keys; concurrent
    asks for one key share a single load (a move asks for one image set's metadata
    from every fetch at once). A failed load is not remembered."""

    def __init__(self, load: Callable[[K], Awaitable[V]], ttl: float, size: int) -> None:
        self._load = load
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[K, tuple[float, asyncio.Future[V]]] = OrderedDict()

    async def get(self, key: K) -> V:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is None or now - entry[0] > self.ttl:
            entry = (now, asyncio.ensure_future(self._load(key)))
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        try:
            return await asyncio.shield(entry[1])
        except Exception:
            if self._entries.get(key) is entry:
                del self._entries[key]
            raise

    def forget(self, key: K) -> None:
        self._entries.pop(key, None)
