"""Reading and checking the header of a received DICOM file.

Used when a C-STORE arrives, and at start-up when the spool adopts files whose rows
were lost, so both apply the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.structure import scan_file
from gateway.uids import is_valid_uid


class HeaderError(Exception):
    """A received file cannot be forwarded; the message names keywords, never values."""


class Unreadable(HeaderError):
    """The data set cannot be parsed or is cut short (C-STORE 0xC000, STOW 0xC000)."""


class Mismatch(HeaderError):
    """A required UID is missing, invalid, or differs from the request (C-STORE 0xA900)."""


@dataclass(frozen=True)
class InstanceHeader:
    """The identifying attributes of a received instance, already validated."""

    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str = ""  # (0008,0060), for routes; "" when absent


KEYWORDS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
MODALITY = 0x00080060


def read_header(
    path: Path, sop_class_uid: str | None, sop_instance_uid: str | None, size: int | None = None
) -> InstanceHeader:
    """Check a received file and read what forwarding needs.

    ``sop_class_uid``/``sop_instance_uid`` are the C-STORE request's (None: not
    compared); ``size``: the instance's length when the file is longer (a spool record
    in its blank). Raises Unreadable or Mismatch with a short reason (no PHI: only UIDs
    and keywords). The element structure is checked against the file length, which
    catches a data set cut short anywhere, pixel data included.
    """
    try:
        length = path.stat().st_size if size is None else size
        with open(path, "rb") as fh:
            scan = scan_file(fh, length, frozenset(KEYWORDS) | {MODALITY})
        if scan.problem:
            raise Unreadable(scan.problem if scan.oversized else f"malformed data set: {scan.problem}")
        uids = {kw: scan.values.get(tag, "") for tag, kw in KEYWORDS.items()}
        modality = scan.values.get(MODALITY, "")
    except HeaderError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parser failure is the sender's malformed data
        raise Unreadable(f"unreadable data set ({type(exc).__name__})") from None
    for kw, value in uids.items():
        if not value:
            raise Mismatch(f"{kw} missing")
        if not is_valid_uid(value):
            raise Mismatch(f"{kw} is not a valid UID")
    if sop_class_uid is not None and uids["SOPClassUID"] != sop_class_uid:
        raise Mismatch("SOP Class UID differs from the request")
    if sop_instance_uid is not None and uids["SOPInstanceUID"] != sop_instance_uid:
        raise Mismatch("SOP Instance UID differs from the request")
    return InstanceHeader(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        transfer_syntax=scan.transfer_syntax,
        modality=modality.strip(),
    )
