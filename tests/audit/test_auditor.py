"""What the fronts hand the audit trail: queries with their values blanked (no patient
data), and an audit message that cannot be made never failing the operation."""

from __future__ import annotations

import base64
import logging
import xml.etree.ElementTree as ET

import pytest
from pydicom import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset

from gateway.audit.auditor import Auditor, StudyTally, blank_query_string, dimse_participant
from gateway.audit.message import AuditEvent, to_xml
from gateway.config import Config

CT01 = dimse_participant("CT01", "10.1.2.3", True)


class Recorded:
    """An audit trail that keeps what it is given (the real one is tested against rsyslog)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def record(self, event: AuditEvent) -> None:
        self.events.append(event)


def test_a_c_find_is_kept_with_its_keys_and_only_uids_and_levels_as_values() -> None:
    trail = Recorded()
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.PatientName = "DOE^JANE"
    identifier.PatientID = "MRN-4711"
    identifier.StudyInstanceUID = "1.2.3.4"
    item = Dataset()
    item.CodeMeaning = "Chest"
    identifier.ProcedureCodeSequence = [item]
    Auditor(Config(), trail).searched(CT01, "1.2.840.10008.5.1.4.1.2.2.1", identifier, True)  # type: ignore[arg-type]
    (event,) = trail.events
    assert event.query is not None
    kept = event.query.query
    assert b"DOE" not in kept and b"MRN" not in kept and b"Chest" not in kept
    fp = DicomBytesIO(kept)
    fp.is_little_endian, fp.is_implicit_VR = True, False
    ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True)
    assert ds.QueryRetrieveLevel == "STUDY" and ds.StudyInstanceUID == "1.2.3.4"
    assert "PatientName" in ds and not ds.PatientName and "PatientID" in ds and not ds.PatientID
    assert len(ds.ProcedureCodeSequence) == 1 and not ds.ProcedureCodeSequence[0].CodeMeaning
    message = ET.fromstring(to_xml(event, "GW"))
    assert base64.b64decode(message.findtext("ParticipantObjectIdentification/ParticipantObjectQuery") or "") == kept


def test_a_qido_rs_query_string_keeps_uids_and_paging_only() -> None:
    blanked = blank_query_string(
        "PatientName=DOE*&00100020=4711&PatientID=12.34&StudyInstanceUID=1.2.3,1.2.4&0020000E=1.5&limit=5&includefield=all"
    )
    # A patient ID of digits and dots looks like a UID: kept or not by its attribute, never its look.
    assert blanked == b"PatientName=&00100020=&PatientID=&StudyInstanceUID=1.2.3,1.2.4&0020000E=1.5&limit=5&includefield=all"


def test_an_audit_message_that_cannot_be_made_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def record(self, event: AuditEvent) -> None:
            raise RuntimeError("trail broken")

    auditor = Auditor(Config(), Broken())  # type: ignore[arg-type]
    tally = StudyTally()
    tally.add("1.2.3", "1.2.840.10008.5.1.4.1.1.2")
    with caplog.at_level(logging.ERROR, logger="gateway.audit"):
        auditor.received(CT01, tally, 1, 0)
    assert "audit message (received) not made" in caplog.text
