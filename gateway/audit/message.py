"""DICOM audit messages (PS3.15 A.5): the events the gateway reports and their XML.

An Audit Record Repository accepts what validates against the DICOM audit message
schema (A.5.1), so the element order, the coded values (``csd-code``,
``codeSystemName``, ``originalText``) and the enumerated attributes follow that schema,
and the builders below fill in what the A.5.3 message descriptions require for each
event. Pure code, no I/O: `gateway.audit.trail` delivers what `to_xml` writes.

Every message is written on one line (no pretty-printing, no raw line breaks) because
the audit file holds one message per line and syslog framing is easiest to check that way.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

Code = tuple[str, str, str]
"""A coded value: (csd-code, codeSystemName, originalText)."""

# EventID (DCID 400)
APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
QUERY: Code = ("110112", "DCM", "Query")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
# EventTypeCode (DCID 401)
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
LOGIN: Code = ("110122", "DCM", "Login")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION: Code = ("110132", "DCM", "Use of Restricted Function")
# RoleIDCode (DCID 402)
ROLE_APPLICATION: Code = ("110150", "DCM", "Application")
ROLE_DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
ROLE_SOURCE: Code = ("110153", "DCM", "Source Role ID")
# ParticipantObjectIDTypeCode (DCID 404)
STUDY_INSTANCE_UID: Code = ("110180", "DCM", "Study Instance UID")
SOP_CLASS_UID: Code = ("110181", "DCM", "SOP Class UID")

# EventOutcomeIndicator (A.5.1): the only four values the schema allows.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12

_ACTIONS = frozenset("CRUDE")
_OUTCOMES = frozenset((SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE))
# AuditSourceTypeCode "4": an application server process, which the gateway is.
_APPLICATION_SERVER = "4"
# ParticipantObjectTypeCode "2" (system object), ParticipantObjectTypeCodeRole "3"
# (report): what A.5.3 prescribes both for a study and for the SOP class of a query.
_SYSTEM_OBJECT, _REPORT = "2", "3"
# Characters XML 1.0 cannot carry at all; peers choose AE titles and error texts can
# quote them, so they are replaced rather than allowed to make the message unparsable.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who took part, from where, in which role.

    ``user_id`` is whatever names the party best: an AE title, the gateway's process,
    a facade user, or "client 10.1.2.3" when nothing better is known. ``address`` is
    the NetworkAccessPointID; whether it is written as an IP address or a host name
    is decided from its form."""

    user_id: str
    requestor: bool
    address: str = ""
    roles: tuple[Code, ...] = ()
    alternative_user_id: str = ""
    user_name: str = ""


@dataclass(frozen=True)
class StudyObject:
    """A study an event touched, with how many instances of each SOP class, since a
    reviewer asks "what left the building" before "which instance"."""

    study_uid: str
    sop_classes: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class QueryObject:
    """What was asked: the query SOP Class and the query itself, kept as bytes because
    A.5.3 records the identifier as sent (base64), whatever its encoding."""

    sop_class_uid: str
    query: bytes
    transfer_syntax: str = ""


@dataclass(frozen=True)
class AuditEvent:
    """One audited event, independent of how it is delivered. Checked on creation so
    that a wrong action or outcome fails at the call site, not in the sender thread."""

    event_id: Code
    action: str
    outcome: int
    participants: tuple[Participant, ...]
    studies: tuple[StudyObject, ...] = ()
    query: QueryObject | None = None
    event_types: tuple[Code, ...] = ()
    outcome_description: str = ""
    when: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.action not in _ACTIONS:
            raise ValueError(f"EventActionCode must be one of C, R, U, D, E, not {self.action!r}")
        if self.outcome not in _OUTCOMES:
            raise ValueError(f"EventOutcomeIndicator must be 0, 4, 8 or 12, not {self.outcome!r}")
        if not self.participants:
            raise ValueError("an audit message needs at least one ActiveParticipant")


def event_datetime(when: float) -> str:
    """xs:dateTime with milliseconds and the local UTC offset (A.5.2.5 wants the time
    zone stated, so a repository in another zone reads the same instant)."""
    return datetime.fromtimestamp(when).astimezone().isoformat(timespec="milliseconds")


def to_xml(event: AuditEvent, source_id: str, site_id: str = "") -> bytes:
    """The event as a DICOM AuditMessage: UTF-8, no XML declaration, one line."""
    root = ET.Element("AuditMessage")
    ident = _sub(
        root, "EventIdentification",
        EventActionCode=event.action,
        EventDateTime=event_datetime(event.when),
        EventOutcomeIndicator=str(event.outcome),
    )
    _code(ident, "EventID", event.event_id)
    for code in event.event_types:
        _code(ident, "EventTypeCode", code)
    if event.outcome_description:
        _sub(ident, "EventOutcomeDescription").text = _text(event.outcome_description)
    for participant in event.participants:
        _participant(root, participant)
    source = _sub(root, "AuditSourceIdentification", AuditSourceID=source_id, AuditEnterpriseSiteID=site_id)
    _sub(source, "AuditSourceTypeCode", **{"csd-code": _APPLICATION_SERVER})
    for study in event.studies:
        _study(root, study)
    if event.query is not None:
        _query(root, event.query)
    xml = ET.tostring(root, encoding="utf-8", xml_declaration=False)
    # Attribute values already have their line breaks escaped; text (an outcome
    # description) does not, and a character reference parses back to the same text.
    return xml.replace(b"\r", b"&#13;").replace(b"\n", b"&#10;")


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _sub(parent: ET.Element, tag: str, **attributes: str) -> ET.Element:
    """A child element with the attributes that have a value, in the order given."""
    return ET.SubElement(parent, tag, {k: _text(v) for k, v in attributes.items() if v})


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    value, system, meaning = code
    _sub(parent, tag, **{"csd-code": value, "codeSystemName": system, "originalText": meaning})


def _access_point_type(address: str) -> str:
    """NetworkAccessPointTypeCode: "2" for an IP address, "1" for a host name."""
    try:
        ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return "1"
    return "2"


def _participant(root: ET.Element, p: Participant) -> None:
    element = _sub(
        root, "ActiveParticipant",
        UserID=p.user_id or "-",  # UserID is mandatory and a token may not be empty
        AlternativeUserID=p.alternative_user_id,
        UserName=p.user_name,
        UserIsRequestor="true" if p.requestor else "false",
        NetworkAccessPointID=p.address,
        NetworkAccessPointTypeCode=_access_point_type(p.address) if p.address else "",
    )
    for role in p.roles:
        _code(element, "RoleIDCode", role)


def _object(root: ET.Element, object_id: str, id_type: Code) -> ET.Element:
    """A system object in the report role, as both a study and a query are."""
    element = _sub(
        root, "ParticipantObjectIdentification",
        ParticipantObjectID=object_id,
        ParticipantObjectTypeCode=_SYSTEM_OBJECT,
        ParticipantObjectTypeCodeRole=_REPORT,
    )
    _code(element, "ParticipantObjectIDTypeCode", id_type)
    return element


def _study(root: ET.Element, study: StudyObject) -> None:
    element = _object(root, study.study_uid, STUDY_INSTANCE_UID)
    for sop_class, count in study.sop_classes:
        _sub(element, "SOPClass", UID=sop_class, NumberOfInstances=str(count))


def _query(root: ET.Element, q: QueryObject) -> None:
    element = _object(root, q.sop_class_uid, SOP_CLASS_UID)
    _sub(element, "ParticipantObjectQuery").text = base64.b64encode(q.query).decode("ascii")
    if q.transfer_syntax:
        value = base64.b64encode(q.transfer_syntax.encode("ascii")).decode("ascii")
        _sub(element, "ParticipantObjectDetail", type="TransferSyntax", value=value)


def _with_role(participant: Participant, role: Code) -> Participant:
    """The participant with ``role`` first among its roles (once)."""
    others = tuple(r for r in participant.roles if r != role)
    return replace(participant, roles=(role, *others))


# Builders: one per A.5.3 message the gateway emits, so call sites cannot get the
# fixed parts (event ID, action, type, roles) wrong.


def application_activity(started: bool, application: Participant) -> AuditEvent:
    """A.5.3.1: the gateway started or stopped."""
    return AuditEvent(
        APPLICATION_ACTIVITY, "E", SUCCESS, (_with_role(application, ROLE_APPLICATION),),
        event_types=(APPLICATION_START if started else APPLICATION_STOP,),
    )


def instances_transferred(
    action: str,
    outcome: int,
    source: Participant,
    destination: Participant,
    studies: Sequence[StudyObject],
    description: str = "",
) -> AuditEvent:
    """A.5.3.7: instances moved between two nodes; ``action`` "C" when the gateway
    received them, "R" when it sent them."""
    return AuditEvent(
        INSTANCES_TRANSFERRED, action, outcome,
        (_with_role(source, ROLE_SOURCE), _with_role(destination, ROLE_DESTINATION)),
        tuple(studies), outcome_description=description,
    )


def query(
    outcome: int, requestor: Participant, responder: Participant, query: QueryObject, description: str = ""
) -> AuditEvent:
    """A.5.3.12: a query; the process that issued it is the Source, the one that
    answers it the Destination."""
    return AuditEvent(
        QUERY, "E", outcome,
        (_with_role(requestor, ROLE_SOURCE), _with_role(responder, ROLE_DESTINATION)),
        query=query, outcome_description=description,
    )


def study_deleted(
    outcome: int, requestor: Participant, studies: Sequence[StudyObject], description: str = ""
) -> AuditEvent:
    """A.5.3.10: studies deleted at someone's request."""
    return AuditEvent(STUDY_DELETED, "D", outcome, (requestor,), tuple(studies), outcome_description=description)


def authentication_failed(user: Participant, application: Participant, description: str) -> AuditEvent:
    """A.5.3.11: a login the gateway refused (the only authentication outcome worth a
    message per request; successful logins would drown the trail)."""
    return AuditEvent(
        USER_AUTHENTICATION, "E", MINOR_FAILURE, (user, application),
        event_types=(LOGIN,), outcome_description=description,
    )


def security_alert(
    event_type: Code, reporter: Participant, offender: Participant | None, description: str
) -> AuditEvent:
    """A.5.3.13: something a security review should see, e.g. a node that failed TLS
    authentication or asked for a function it may not use."""
    participants = (reporter,) if offender is None else (reporter, offender)
    return AuditEvent(
        SECURITY_ALERT, "E", MINOR_FAILURE, participants,
        event_types=(event_type,), outcome_description=description,
    )
