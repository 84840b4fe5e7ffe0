"""What a C-MOVE/C-GET asks for, and the statuses it can end with (PS3.4 C.4.2, C.4.3).

Apart from the service because none of it touches the network: checking an identifier
against the standard's rules and turning an error into a status is what a reviewer
reads beside PS3.4, and what the tests exercise alone. Errors become statuses here,
in one table (`failure_status`), whichever part of the retrieval raised them. The
request itself is the engine's (`gateway.retrieval.request`): other fronts make one too.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from gateway.retrieval.request import PATIENT_ID, SERIES_UID, SOP_INSTANCE_UID, STUDY_UID, RetrieveRequest
from gateway.uids import is_valid_uid
from gateway.upstream.errors import SearchTruncated, UpstreamAuthError, UpstreamRejected, UpstreamUnavailable

# Statuses (PS3.4 C.4.2.1.5, C.4.3.1.4)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000
OUT_OF_RESOURCES_MATCHES = 0xA701
OUT_OF_RESOURCES_SUBOPS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000

QUERY_RETRIEVE_LEVEL = 0x00080052
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_CLASSES = frozenset({STUDY_ROOT_MOVE, STUDY_ROOT_GET})


class RetrieveError(Exception):
    """The request cannot be served; ``status`` is the final status to send."""

    def __init__(self, message: str, status: int, offending: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.offending = tuple(offending)


class Failure(NamedTuple):
    """The status a failed request ends with, its Error Comment, and whether the error
    is a fault of ours (``internal``: logged with its traceback) rather than of the
    request or the archive."""

    status: int
    comment: str
    internal: bool = False


def failure_status(exc: BaseException) -> Failure:
    """The one table from errors before any sub-operation to C-MOVE/C-GET statuses
    (and their comments). A search failing after sub-operations began ends with the
    counts instead: `gateway.dimse.retrieve.final_status` with ``complete=False``."""
    if isinstance(exc, RetrieveError):
        return Failure(exc.status, str(exc))
    if isinstance(exc, UpstreamAuthError):
        return Failure(UNABLE_TO_PROCESS, "archive refused the gateway's credentials")
    if isinstance(exc, UpstreamRejected):
        return Failure(UNABLE_TO_PROCESS, str(exc))
    if isinstance(exc, SearchTruncated):
        return Failure(OUT_OF_RESOURCES_MATCHES, "archive capped the search: not every match is known")
    if isinstance(exc, (UpstreamUnavailable, TimeoutError)):
        return Failure(OUT_OF_RESOURCES_MATCHES, f"archive unavailable: {exc}" if str(exc) else "archive unavailable")
    return Failure(UNABLE_TO_PROCESS, f"internal error ({type(exc).__name__})", internal=True)


# -- the request ------------------------------------------------------------------------


def _values(ds: Dataset, tag: int) -> tuple[str, ...]:
    """The element's values, each once (a UID named twice is retrieved, and counted
    against the archive's count, once)."""
    elem = ds.get(tag)
    if elem is None or elem.value in (None, ""):
        return ()
    raw = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    return tuple(dict.fromkeys(str(v).strip().rstrip("\x00") for v in raw if str(v).strip()))


def parse_retrieve_identifier(ds: Dataset, study_root: bool) -> RetrieveRequest:
    """Validate a retrieve identifier (PS3.4 C.4.2.2.1: unique keys only, hierarchical).

    A list of UIDs is allowed at the retrieve level; the levels above need their one
    unique key, except that the study (and series) UID may be left out at SERIES and
    IMAGE level, since UIDs are unique anyway and SCUs do leave them out.
    """
    level_elem = ds.get(QUERY_RETRIEVE_LEVEL)
    level = str(level_elem.value).strip().upper() if level_elem is not None and level_elem.value else ""
    if level not in LEVELS or (study_root and level == "PATIENT"):
        raise RetrieveError(f"QueryRetrieveLevel {level!r} not valid here", IDENTIFIER_DOES_NOT_MATCH, [QUERY_RETRIEVE_LEVEL])
    studies, series, sops = _values(ds, STUDY_UID), _values(ds, SERIES_UID), _values(ds, SOP_INSTANCE_UID)
    for tag, uids in ((STUDY_UID, studies), (SERIES_UID, series), (SOP_INSTANCE_UID, sops)):
        if any(not is_valid_uid(u) for u in uids):
            raise RetrieveError("invalid UID in the identifier", IDENTIFIER_DOES_NOT_MATCH, [tag])
    patient = _values(ds, PATIENT_ID)
    if level == "PATIENT":
        if len(patient) != 1 or "*" in patient[0] or "?" in patient[0]:
            raise RetrieveError("PATIENT level needs one PatientID", IDENTIFIER_DOES_NOT_MATCH, [PATIENT_ID])
        return RetrieveRequest(level, patient_id=patient[0])
    if level == "STUDY":
        if not studies:
            raise RetrieveError("STUDY level needs StudyInstanceUID", IDENTIFIER_DOES_NOT_MATCH, [STUDY_UID])
        return RetrieveRequest(level, study_uids=studies)
    if len(studies) > 1:
        raise RetrieveError("one StudyInstanceUID above the retrieve level", IDENTIFIER_DOES_NOT_MATCH, [STUDY_UID])
    if level == "SERIES":
        if not series:
            raise RetrieveError("SERIES level needs SeriesInstanceUID", IDENTIFIER_DOES_NOT_MATCH, [SERIES_UID])
        return RetrieveRequest(level, study_uids=studies, series_uids=series)
    if len(series) > 1:
        raise RetrieveError("one SeriesInstanceUID above the retrieve level", IDENTIFIER_DOES_NOT_MATCH, [SERIES_UID])
    if not sops:
        raise RetrieveError("IMAGE level needs SOPInstanceUID", IDENTIFIER_DOES_NOT_MATCH, [SOP_INSTANCE_UID])
    return RetrieveRequest(level, study_uids=studies, series_uids=series, sop_uids=sops)
