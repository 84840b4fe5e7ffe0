"""The emulated data store: image sets holding instances, organised as HealthImaging does.

* Instances of a study join the study's *primary* image set, unless one of the
  patient or study attributes an image set holds once (`IMAGE_SET_LEVEL`) disagrees
  with it: then they go to a *non-primary* image set (found again for later
  instances with the same values), which DICOMweb only shows with ``imageSetId``.
* Lossless pixel data is stored as HTJ2K with RPCL progression (1.2.840.10008.1.2.4.202,
  the data store default), encoded with OpenJPH through the gateway's codecs; lossy
  pixel data, and pixel data the encoder cannot take, is kept as received.
* Every instance added to an existing image set makes a new version of it.

Mutations hold one lock (the aiohttp thread writes, tests read); the expensive part
of a store (parsing, encoding) is done before taking it, by `prepare`.
"""

from __future__ import annotations

import io
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar, cast

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames

from gateway.codecs import Fidelity, TranscodeError, syntax_info, transcode

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
HTJ2K_RPCL = "1.2.840.10008.1.2.4.202"

# Attributes an image set holds once (patient and study level); an instance that
# disagrees with the study's primary image set on any of them is not merged into it.
IMAGE_SET_LEVEL = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
)


T = TypeVar("T")
# Searches remembered between two stores (distinct criteria; the oldest dropped first).
REMEMBERED_SEARCHES = 16


def new_id() -> str:
    """A 32-character lower-case hex identifier (image sets, frames)."""
    return secrets.token_hex(16)


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


@dataclass
class Instance:
    """One stored instance: its attributes as received and its stored representation."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    header: Dataset  # as received, without Pixel Data: searches and metadata
    original: Dataset  # as received, Pixel Data included: the source of conversions
    stored: bytes  # the Part 10 file in `stored_syntax`
    stored_syntax: str
    frames: list[bytes]  # each frame's pixel data in `stored_syntax`
    frame_ids: list[str]
    image_set_id: str = ""
    version: int = 0  # the image set version that added it
    updated: float = 0.0

    @property
    def number(self) -> int:
        value = self.header.get("InstanceNumber")
        try:
            return int(value) if value not in (None, "") else 0
        except (TypeError, ValueError):
            return 0


@dataclass
class ImageSet:
    """A study's instances as one versioned image set."""

    id: str
    study_uid: str
    primary: bool
    attributes: dict[str, str]
    created_at: float
    updated_at: float
    version: int = 1
    history: list[tuple[int, float, str]] = field(default_factory=list)  # (version, updatedAt, workflow status)
    instances: dict[str, Instance] = field(default_factory=dict)

    def series(self) -> dict[str, list[Instance]]:
        grouped: dict[str, list[Instance]] = {}
        for inst in self.instances.values():
            grouped.setdefault(inst.series_uid, []).append(inst)
        return grouped


class Unstorable(Exception):
    """A part STOW-RS cannot store; ``reason`` is its PS3.18 FailureReason."""

    def __init__(self, reason: int, message: str, sop_class_uid: str = "", sop_instance_uid: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


def _part10(ds: Dataset) -> bytes:
    """A Part 10 file in the dataset's File Meta syntax (a converted dataset may have
    been read in another byte order)."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _frames(ds: Dataset, syntax: str) -> list[bytes]:
    """The pixel data of each frame, as stored (one codestream per frame when encapsulated)."""
    if "PixelData" not in ds:
        return []
    try:
        count = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        count = 1  # an unreadable Number of Frames: one frame, as viewers read it
    if syntax_info(syntax).encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    data = bytes(ds.PixelData)
    size = len(data) // count
    return [data[i * size : (i + 1) * size] for i in range(count)]


def prepare(raw: bytes) -> Instance:
    """Parse and encode one received Part 10 file (blocking; run in a thread)."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), force=False)
    except Exception as exc:  # noqa: BLE001 - whatever pydicom cannot read is not DICOM to us
        raise Unstorable(0xC000, f"not a readable DICOM file: {type(exc).__name__}") from None
    sop_class, sop_uid = _text(ds, "SOPClassUID"), _text(ds, "SOPInstanceUID")
    study_uid, series_uid = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
    if not (sop_class and sop_uid and study_uid and series_uid):
        raise Unstorable(0xA900, "SOP Class, SOP Instance, Study or Series Instance UID missing", sop_class, sop_uid)
    received = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_VR_LE))
    stored_ds, stored_syntax, stored = ds, received, raw
    if "PixelData" in ds:
        try:
            if syntax_info(received).fidelity is Fidelity.LOSSLESS:
                stored_ds = transcode(ds, HTJ2K_RPCL)
                stored_syntax = HTJ2K_RPCL
                stored = _part10(stored_ds)
        except (TranscodeError, ValueError, RuntimeError, NotImplementedError):
            stored_ds, stored_syntax, stored = ds, received, raw  # kept as received, as a warning import
    header = Dataset()
    header.update({elem.tag: elem for elem in ds if elem.tag != 0x7FE00010})
    header.file_meta = FileMetaDataset(ds.file_meta)
    frames = _frames(stored_ds, stored_syntax)
    return Instance(
        sop_instance_uid=sop_uid,
        sop_class_uid=sop_class,
        study_uid=study_uid,
        series_uid=series_uid,
        header=header,
        original=ds,
        stored=stored,
        stored_syntax=stored_syntax,
        frames=frames,
        frame_ids=[new_id() for _ in frames],
    )


def convert(instance: Instance, syntax: str) -> bytes | None:
    """The instance as a Part 10 file in ``syntax``, or None when it cannot be served so
    (blocking). The stored syntax always; Explicit VR Little Endian by decoding."""
    if syntax == instance.stored_syntax:
        return instance.stored
    if syntax != EXPLICIT_VR_LE:
        return None
    try:
        return _part10(transcode(instance.original, EXPLICIT_VR_LE))
    except (TranscodeError, ValueError, RuntimeError, NotImplementedError):
        return None


def native_frames(instance: Instance) -> list[bytes] | None:
    """Each frame decoded to Explicit VR Little Endian pixel bytes, or None."""
    data = convert(instance, EXPLICIT_VR_LE)
    if data is None:
        return None
    ds = pydicom.dcmread(io.BytesIO(data))
    return _frames(ds, EXPLICIT_VR_LE)


class Datastore:
    """One data store: its image sets and the index of primary ones by study."""

    def __init__(self, datastore_id: str) -> None:
        self.id = datastore_id
        self.image_sets: dict[str, ImageSet] = {}
        self.primary_by_study: dict[str, str] = {}
        self.lock = threading.Lock()
        self._generation = 0  # stores so far: what a remembered search was made on
        self._remembered: dict[Hashable, object] = {}

    def remembered(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``, or what it gave for ``key`` when nothing was stored since. A
        search paged through 10,000 image sets (a page of 50 for SearchImageSets, of
        1,000 for QIDO-RS) then selects and sorts them once, not once per page: the
        answers are the same, and the longest test no longer waits on it. ``compute``
        runs outside the lock (it may take it); callers must not change the result."""
        with self.lock:
            if key in self._remembered:
                return cast(T, self._remembered[key])
            generation = self._generation
        value = compute()
        with self.lock:
            if self._generation == generation:
                if len(self._remembered) >= REMEMBERED_SEARCHES:
                    del self._remembered[next(iter(self._remembered))]
                self._remembered[key] = value
        return value

    def _target(self, inst: Instance, now: float) -> ImageSet:
        """The image set an instance joins (created if needed); under the lock."""
        values = {k: _text(inst.header, k) for k in IMAGE_SET_LEVEL}
        primary_id = self.primary_by_study.get(inst.study_uid)
        if primary_id is None:
            image_set = ImageSet(new_id(), inst.study_uid, True, values, now, now, history=[(1, now, "CREATED")])
            self.image_sets[image_set.id] = image_set
            self.primary_by_study[inst.study_uid] = image_set.id
            return image_set
        primary = self.image_sets[primary_id]
        if primary.attributes == values:
            return primary
        for image_set in self.image_sets.values():
            if not image_set.primary and image_set.study_uid == inst.study_uid and image_set.attributes == values:
                return image_set
        image_set = ImageSet(new_id(), inst.study_uid, False, values, now, now, history=[(1, now, "CREATED")])
        self.image_sets[image_set.id] = image_set
        return image_set

    def add(self, inst: Instance) -> ImageSet:
        """Store a prepared instance; a new one in an existing image set makes a version."""
        with self.lock:
            self._generation += 1
            self._remembered.clear()
            now = time.time()
            image_set = self._target(inst, now)
            if image_set.instances:
                image_set.version += 1
                image_set.history.append((image_set.version, now, "UPDATED"))
            image_set.updated_at = now
            inst.image_set_id, inst.version, inst.updated = image_set.id, image_set.version, now
            image_set.instances.pop(inst.sop_instance_uid, None)
            image_set.instances[inst.sop_instance_uid] = inst
            return image_set

    def primary_sets(self) -> list[ImageSet]:
        with self.lock:
            return [s for s in self.image_sets.values() if s.primary]

    def find_instance(self, study: str, series: str, sop: str, image_set_id: str | None) -> Instance | None:
        """An instance as WADO-RS addresses it: in the study's primary image set, or in
        the image set named by ``imageSetId``."""
        with self.lock:
            set_id = image_set_id or self.primary_by_study.get(study)
            image_set = self.image_sets.get(set_id or "")
            if image_set is None or image_set.study_uid != study:
                return None
            inst = image_set.instances.get(sop)
            return inst if inst is not None and inst.series_uid == series else None

    def series_instances(self, study: str, series: str, image_set_id: str | None) -> list[Instance]:
        with self.lock:
            set_id = image_set_id or self.primary_by_study.get(study)
            image_set = self.image_sets.get(set_id or "")
            if image_set is None or image_set.study_uid != study:
                return []
            return sorted((i for i in image_set.instances.values() if i.series_uid == series), key=lambda i: i.number)

    def instances(self) -> Iterator[Instance]:
        """Every stored instance, primary or not (for tests)."""
        with self.lock:
            found = [i for s in self.image_sets.values() for i in s.instances.values()]
        yield from found
