"""What a retrieval asks for, and the instances a search lists for it.

Neutral: a C-MOVE/C-GET identifier (`gateway.dimse.retrieve_request`) and a WADO-RS
path both come down to a level and the unique keys down to it.
"""

from __future__ import annotations

from dataclasses import dataclass

# The attributes that name what is retrieved (their tags, for searches and identifiers).
PATIENT_ID = 0x00100020
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
SOP_CLASS_UID = 0x00080016


@dataclass(frozen=True)
class RetrieveRequest:
    """A level (PATIENT, STUDY, SERIES or IMAGE) and the unique keys down to it."""

    level: str
    patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstanceRef:
    """One instance as the search listed it (the SOP class may be "" when it had none)."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
