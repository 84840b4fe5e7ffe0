"""The DICOM audit messages (PS3.15 A.5) each builder writes, read back with
xml.etree: schema element order, coded values, base64 query, access point types and
time zones."""

from __future__ import annotations

import base64
import time
import xml.etree.ElementTree as ET
from datetime import datetime

import pytest

from gateway.audit import message as m
from gateway.audit.message import (
    MAJOR_FAILURE,
    MINOR_FAILURE,
    SUCCESS,
    AuditEvent,
    Code,
    Participant,
    QueryObject,
    StudyObject,
    to_xml,
)

MODALITY = Participant("CT01", True, "10.1.2.3", alternative_user_id="AETITLES=CT01")
GATEWAY = Participant("4242", False, "gateway.example.org", user_name="GATEWAY")
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def parse(event: AuditEvent, site_id: str = "") -> ET.Element:
    return ET.fromstring(to_xml(event, "GW_AE", site_id))


def code_of(element: ET.Element | None) -> Code:
    assert element is not None
    return (element.get("csd-code"), element.get("codeSystemName"), element.get("originalText"))


def roles(root: ET.Element) -> list[list[str]]:
    return [[r.get("csd-code") for r in p.findall("RoleIDCode")] for p in root.findall("ActiveParticipant")]


def check_layout(root: ET.Element) -> None:
    """A.5.1's order: EventIdentification, ActiveParticipant+, AuditSourceIdentification,
    ParticipantObjectIdentification*; inside the event: EventID, EventTypeCode*,
    EventOutcomeDescription?."""
    tags = [child.tag for child in root]
    assert tags[0] == "EventIdentification"
    n = tags.count("ActiveParticipant")
    assert n >= 1 and tags[1 : 1 + n] == ["ActiveParticipant"] * n
    assert tags[1 + n] == "AuditSourceIdentification"
    assert set(tags[2 + n :]) <= {"ParticipantObjectIdentification"}
    inner = [child.tag for child in root.find("EventIdentification")]
    types = inner.count("EventTypeCode")
    assert inner[: 1 + types] == ["EventID"] + ["EventTypeCode"] * types
    assert inner[1 + types :] in ([], ["EventOutcomeDescription"])
    source = root.find("AuditSourceIdentification")
    assert source.get("AuditSourceID") == "GW_AE"
    assert [(c.tag, c.attrib) for c in source] == [("AuditSourceTypeCode", {"csd-code": "4"})]


def test_codes_are_the_dcm_ones() -> None:
    expected = {
        "APPLICATION_ACTIVITY": "110100", "INSTANCES_TRANSFERRED": "110104", "STUDY_DELETED": "110105",
        "QUERY": "110112", "SECURITY_ALERT": "110113", "USER_AUTHENTICATION": "110114",
        "APPLICATION_START": "110120", "APPLICATION_STOP": "110121", "LOGIN": "110122",
        "NODE_AUTHENTICATION": "110126", "USE_OF_RESTRICTED_FUNCTION": "110132",
        "ROLE_APPLICATION": "110150", "ROLE_DESTINATION": "110152", "ROLE_SOURCE": "110153",
        "STUDY_INSTANCE_UID": "110180", "SOP_CLASS_UID": "110181",
    }
    for name, value in expected.items():
        code, system, meaning = getattr(m, name)
        assert (code, system) == (value, "DCM") and meaning, name
    assert (SUCCESS, MINOR_FAILURE, m.SERIOUS_FAILURE, MAJOR_FAILURE) == (0, 4, 8, 12)


@pytest.mark.parametrize(("started", "event_type"), [(True, m.APPLICATION_START), (False, m.APPLICATION_STOP)])
def test_application_activity(started: bool, event_type: Code) -> None:
    root = parse(m.application_activity(started, GATEWAY), site_id="Hospital")
    check_layout(root)
    ident = root.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("E", "0")
    assert code_of(ident.find("EventID")) == m.APPLICATION_ACTIVITY
    assert [code_of(e) for e in ident.findall("EventTypeCode")] == [event_type]
    (participant,) = root.findall("ActiveParticipant")
    assert participant.attrib == {
        "UserID": "4242", "UserName": "GATEWAY", "UserIsRequestor": "false",
        "NetworkAccessPointID": "gateway.example.org", "NetworkAccessPointTypeCode": "1",
    }
    assert [code_of(r) for r in participant.findall("RoleIDCode")] == [m.ROLE_APPLICATION]
    assert root.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == "Hospital"
    assert root.find("ParticipantObjectIdentification") is None


@pytest.mark.parametrize("action", ["C", "R"])
def test_instances_transferred(action: str) -> None:
    studies = [StudyObject("1.2.3", ((CT, 12), ("1.2.840.10008.5.1.4.1.1.7", 1))), StudyObject("1.2.4")]
    root = parse(m.instances_transferred(action, MINOR_FAILURE, MODALITY, GATEWAY, studies, "2 of 15 refused"))
    check_layout(root)
    ident = root.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == (action, "4")
    assert code_of(ident.find("EventID")) == m.INSTANCES_TRANSFERRED
    assert ident.findtext("EventOutcomeDescription") == "2 of 15 refused"
    assert roles(root) == [["110153"], ["110152"]]
    source, destination = root.findall("ActiveParticipant")
    assert source.attrib == {
        "UserID": "CT01", "AlternativeUserID": "AETITLES=CT01", "UserIsRequestor": "true",
        "NetworkAccessPointID": "10.1.2.3", "NetworkAccessPointTypeCode": "2",
    }
    assert destination.get("UserIsRequestor") == "false"
    first, second = root.findall("ParticipantObjectIdentification")
    assert first.attrib == {
        "ParticipantObjectID": "1.2.3", "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
    }
    assert [c.tag for c in first] == ["ParticipantObjectIDTypeCode", "SOPClass", "SOPClass"]
    assert code_of(first.find("ParticipantObjectIDTypeCode")) == m.STUDY_INSTANCE_UID
    assert [s.attrib for s in first.findall("SOPClass")] == [
        {"UID": CT, "NumberOfInstances": "12"}, {"UID": "1.2.840.10008.5.1.4.1.1.7", "NumberOfInstances": "1"},
    ]
    assert second.get("ParticipantObjectID") == "1.2.4" and second.find("SOPClass") is None


def test_query_keeps_the_identifier_base64_and_its_transfer_syntax() -> None:
    identifier = b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY \x00\xff"
    q = QueryObject(STUDY_ROOT_FIND, identifier, "1.2.840.10008.1.2.1")
    root = parse(m.query(SUCCESS, MODALITY, GATEWAY, q))
    check_layout(root)
    ident = root.find("EventIdentification")
    assert ident.get("EventActionCode") == "E" and code_of(ident.find("EventID")) == m.QUERY
    assert roles(root) == [["110153"], ["110152"]]  # A.5.3.12: the requestor is the Source
    (obj,) = root.findall("ParticipantObjectIdentification")
    assert obj.attrib == {
        "ParticipantObjectID": STUDY_ROOT_FIND, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3",
    }
    assert [c.tag for c in obj] == ["ParticipantObjectIDTypeCode", "ParticipantObjectQuery", "ParticipantObjectDetail"]
    assert code_of(obj.find("ParticipantObjectIDTypeCode")) == m.SOP_CLASS_UID
    assert base64.b64decode(obj.findtext("ParticipantObjectQuery")) == identifier
    detail = obj.find("ParticipantObjectDetail")
    assert detail.get("type") == "TransferSyntax"
    assert base64.b64decode(detail.get("value")) == b"1.2.840.10008.1.2.1"


def test_qido_query_has_no_transfer_syntax_detail() -> None:
    q = QueryObject(STUDY_ROOT_FIND, b"PatientID=&StudyInstanceUID=1.2.3&limit=10")
    obj = parse(m.query(MINOR_FAILURE, MODALITY, GATEWAY, q, "upstream 502")).find("ParticipantObjectIdentification")
    assert obj.find("ParticipantObjectDetail") is None
    assert base64.b64decode(obj.findtext("ParticipantObjectQuery")) == q.query


def test_study_deleted() -> None:
    admin = Participant("admin", True, "192.0.2.7")
    root = parse(m.study_deleted(MAJOR_FAILURE, admin, [StudyObject("1.2.3")], "archive refused"))
    check_layout(root)
    ident = root.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("D", "12")
    assert code_of(ident.find("EventID")) == m.STUDY_DELETED
    assert [p.get("UserID") for p in root.findall("ActiveParticipant")] == ["admin"]
    assert root.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "1.2.3"


def test_authentication_failed() -> None:
    user = Participant("mallory", True, "2001:db8::5")
    root = parse(m.authentication_failed(user, GATEWAY, "bad password"))
    check_layout(root)
    ident = root.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("E", "4")
    assert code_of(ident.find("EventID")) == m.USER_AUTHENTICATION
    assert [code_of(e) for e in ident.findall("EventTypeCode")] == [m.LOGIN]
    assert ident.findtext("EventOutcomeDescription") == "bad password"
    first, second = root.findall("ActiveParticipant")
    assert (first.get("UserID"), first.get("NetworkAccessPointTypeCode")) == ("mallory", "2")
    assert second.get("UserID") == "4242"


@pytest.mark.parametrize("offender", [MODALITY, None])
def test_security_alert(offender: Participant | None) -> None:
    root = parse(m.security_alert(m.NODE_AUTHENTICATION, GATEWAY, offender, "TLS handshake failed"))
    check_layout(root)
    ident = root.find("EventIdentification")
    assert (ident.get("EventActionCode"), ident.get("EventOutcomeIndicator")) == ("E", "4")
    assert code_of(ident.find("EventID")) == m.SECURITY_ALERT
    assert [code_of(e) for e in ident.findall("EventTypeCode")] == [m.NODE_AUTHENTICATION]
    expected = ["4242", "CT01"] if offender else ["4242"]
    assert [p.get("UserID") for p in root.findall("ActiveParticipant")] == expected


@pytest.mark.parametrize(
    ("address", "type_code"),
    [("10.1.2.3", "2"), ("::1", "2"), ("[2001:db8::1]", "2"), ("pacs.example.org", "1"), ("pacs", "1"), ("", None)],
)
def test_access_point_type_follows_the_address(address: str, type_code: str | None) -> None:
    root = parse(m.application_activity(True, Participant("x", False, address)))
    participant = root.find("ActiveParticipant")
    assert participant.get("NetworkAccessPointTypeCode") == type_code
    assert participant.get("NetworkAccessPointID") == (address or None)


def test_event_time_has_a_time_zone_and_is_the_events() -> None:
    when = 1_700_000_000.25
    event = AuditEvent(m.APPLICATION_ACTIVITY, "E", SUCCESS, (GATEWAY,), when=when)
    stamp = parse(event).find("EventIdentification").get("EventDateTime")
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None
    assert parsed.timestamp() == when
    default = AuditEvent(m.APPLICATION_ACTIVITY, "E", SUCCESS, (GATEWAY,))
    assert abs(default.when - time.time()) < 5


def test_one_utf8_line_without_declaration_whatever_the_text() -> None:
    nasty = "line one\nline two\r\n<b>&amp;</b> Müller \x00\x1b end"
    event = m.security_alert(m.USE_OF_RESTRICTED_FUNCTION, GATEWAY, Participant("A\nB", True), nasty)
    xml = to_xml(event, "GW_AE")
    assert b"\n" not in xml and b"\r" not in xml and not xml.startswith(b"<?xml")
    root = ET.fromstring(xml.decode("utf-8"))
    assert root.findtext("EventIdentification/EventOutcomeDescription") == (
        "line one\nline two\r\n<b>&amp;</b> Müller \ufffd\ufffd end"
    )
    assert root.findall("ActiveParticipant")[1].get("UserID") == "A\nB"


def test_a_builder_role_is_not_repeated() -> None:
    already = Participant("CT01", True, roles=(m.ROLE_SOURCE,))
    root = parse(m.instances_transferred("C", SUCCESS, already, GATEWAY, []))
    assert roles(root) == [["110153"], ["110152"]]


@pytest.mark.parametrize(
    ("kwargs", "complaint"),
    [({"action": "X"}, "EventActionCode"), ({"outcome": 3}, "EventOutcomeIndicator"), ({"participants": ()}, "ActiveParticipant")],
)
def test_invalid_events_fail_at_the_call_site(kwargs: dict[str, object], complaint: str) -> None:
    fields: dict[str, object] = {
        "event_id": m.APPLICATION_ACTIVITY, "action": "E", "outcome": SUCCESS, "participants": (GATEWAY,), **kwargs
    }
    with pytest.raises(ValueError, match=complaint):
        AuditEvent(**fields)  # type: ignore[arg-type]
