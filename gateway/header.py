"""Reading and checking the header of a received DICOM file.

Used when a C-STORE arrives, and at start-up when the spool adopts files whose rows
were lost, so both apply the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.structure import check_structure
from gateway.uids import is_valid_uid


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of a received instance, already validated."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str


def read_header(
    path: Path, sop_class_uid: str | None, sop_instance_uid: str | None
) -> tuple[InstanceHeader | None, str]:
    """Parse the received file's header and check what forwarding needs.

    ``sop_class_uid``/``sop_instance_uid`` are the C-STORE request's (None: not
    compared). Returns the header, or None and a short reason (no PHI: only UIDs and keywords).
    Large elements are deferred so that an encapsulated 100 MB PDF is not read; the
    element structure is then checked against the file length, which catches a data
    set cut short anywhere, pixel data included.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, defer_size="256 KB")
        uids = {
            kw: ds.get(kw)
            for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        dataset_offset = 128 + 4 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
        with open(path, "rb") as fh:
            broken = check_structure(fh, dataset_offset, path.stat().st_size, transfer_syntax)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        return None, f"unreadable data set ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - any parser failure is the sender's malformed data
        return None, f"unreadable data set ({type(exc).__name__})"
    if broken:
        return None, f"malformed data set: {broken}"
    for kw, value in uids.items():
        if value is None or value == "":
            return None, f"{kw} missing"
        if not is_valid_uid(str(value)):
            return None, f"{kw} is not a valid UID"
    if sop_class_uid is not None and str(uids["SOPClassUID"]) != sop_class_uid:
        return None, "SOP Class UID differs from the request"
    if sop_instance_uid is not None and str(uids["SOPInstanceUID"]) != sop_instance_uid:
        return None, "SOP Instance UID differs from the request"
    return (
        InstanceHeader(
            sop_instance_uid=str(uids["SOPInstanceUID"]),
            sop_class_uid=str(uids["SOPClassUID"]),
            study_uid=str(uids["StudyInstanceUID"]),
            series_uid=str(uids["SeriesInstanceUID"]),
            transfer_syntax=transfer_syntax,
        ),
        "",
    )
