"""Image set metadata in the documented JSON shape (GetImageSetMetadata), gzip-compressed:

    {"SchemaVersion": "1.1", "DatastoreID": ..., "ImageSetID": ...,
     "Patient": {"DICOM": {...}},
     "Study": {"DICOM": {...}, "Series": {"<series UID>": {"DICOM": {...}, "Instances":
         {"<SOP UID>": {"DICOM": {...}, "DICOMVRs": {...}, "StoredTransferSyntaxUID": ...,
                        "ImageFrames": [{"ID", "PixelDataChecksumFromBaseToFullResolution",
                                         "MinPixelValue", "MaxPixelValue", "FrameSizeInBytes"}]}}}}}}

Attributes are keyed by keyword (private ones and those of repeating groups, which
have no keyword of their own, by tag, their VR in ``DICOMVRs``),
multi-valued ones as lists, sequences as lists of objects; binary values other than
the frames are left out. Frame checksums are CRC32 of the full-resolution decoded
frame (the guide shows the field, not how it is computed).
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import imagecodecs
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from tests.support.healthimaging.store import HTJ2K_RPCL, ImageSet, Instance

PATIENT_LEVEL = frozenset({
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientNames", "OtherPatientIDsSequence", "PatientComments", "EthnicGroup",
})
STUDY_LEVEL = frozenset({
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "PatientAge", "PatientSize", "PatientWeight",
})
SERIES_LEVEL = frozenset({
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "Laterality", "ProtocolName", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
})
_BINARY_VRS = frozenset({"OB", "OW", "OD", "OF", "OL", "OV", "UN"})


def _value(elem: DataElement) -> Any:
    if elem.VR == "SQ":
        return [_attributes(item)[0] for item in elem.value]
    if elem.VM == 0:
        return ""
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    plain = [v if isinstance(v, (int, float)) else str(v) for v in values]
    return plain if elem.VM > 1 else plain[0]


def _attributes(ds: Dataset, only: frozenset[str] | None = None, skip: frozenset[str] = frozenset()) -> tuple[dict[str, Any], dict[str, str]]:
    values: dict[str, Any] = {}
    vrs: dict[str, str] = {}
    for elem in ds:
        if elem.tag.group <= 0x0002 or elem.tag == 0x7FE00010 or elem.VR in _BINARY_VRS:
            continue
        if elem.tag.is_private or not elem.keyword:  # private, or of a repeating group (60xx overlays)
            key = f"{elem.tag:08X}"
            vrs[key] = elem.VR
        else:
            key = elem.keyword
            if (only is not None and key not in only) or key in skip:
                continue
        values[key] = _value(elem)
    return values, vrs


def _frame_entries(inst: Instance) -> list[dict[str, Any]]:
    entries = []
    rows, columns = int(inst.header.get("Rows", 0) or 0), int(inst.header.get("Columns", 0) or 0)
    for frame_id, data in zip(inst.frame_ids, inst.frames):
        entry: dict[str, Any] = {"ID": frame_id, "FrameSizeInBytes": len(data)}
        if inst.stored_syntax == HTJ2K_RPCL:
            pixels = imagecodecs.htj2k_decode(data)
            entry["PixelDataChecksumFromBaseToFullResolution"] = [
                {"Width": columns, "Height": rows, "Checksum": zlib.crc32(pixels.tobytes())}
            ]
            entry["MinPixelValue"] = int(pixels.min())
            entry["MaxPixelValue"] = int(pixels.max())
        entries.append(entry)
    return entries


def image_set_metadata(datastore_id: str, image_set: ImageSet, version: int) -> dict[str, Any]:
    """The metadata document of one version of an image set."""
    instances = [i for i in image_set.instances.values() if i.version <= version]
    first = instances[0].header
    series: dict[str, Any] = {}
    for inst in instances:
        entry = series.setdefault(
            inst.series_uid, {"DICOM": _attributes(inst.header, SERIES_LEVEL)[0], "Instances": {}}
        )
        values, vrs = _attributes(inst.header, skip=PATIENT_LEVEL | STUDY_LEVEL | SERIES_LEVEL)
        entry["Instances"][inst.sop_instance_uid] = {
            "DICOM": values,
            "DICOMVRs": vrs,
            "StoredTransferSyntaxUID": inst.stored_syntax,
            "ImageFrames": _frame_entries(inst),
        }
    return {
        "SchemaVersion": "1.1",
        "DatastoreID": datastore_id,
        "ImageSetID": image_set.id,
        "Patient": {"DICOM": _attributes(first, PATIENT_LEVEL)[0]},
        "Study": {"DICOM": _attributes(first, STUDY_LEVEL)[0], "Series": series},
    }


def gzipped(document: dict[str, Any]) -> bytes:
    return gzip.compress(json.dumps(document).encode("utf-8"))
