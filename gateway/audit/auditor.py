"""What the gateway tells its audit trail, in the terms of the two fronts.

The DIMSE handlers and the facade's routes know who asked (an AE title and address,
a facade user and address) and what moved (study UIDs, SOP classes); this module turns
that into PS3.15 A.5 audit messages with the gateway as the other participant, so a
call site is one line. Without ``[audit]`` every call returns at once.

What a message never holds: patient names, IDs or birth dates. The audit trail goes to
a repository, but the rule for anything the gateway writes stays the one for its logs.
So there is no Patient participant object (studies are named by UID), and a query is
recorded with its keys, UIDs and levels but every other value emptied
(`blank_query`, `blank_query_string`).
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from typing import ParamSpec

from pydicom import Dataset
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from gateway.audit.message import (
    MINOR_FAILURE,
    NODE_AUTHENTICATION,
    SERIOUS_FAILURE,
    SUCCESS,
    USE_OF_RESTRICTED_FUNCTION,
    AuditEvent,
    Code,
    Participant,
    QueryObject,
    StudyObject,
    application_activity,
    authentication_failed,
    instances_transferred,
    query,
    security_alert,
    study_deleted,
)
from gateway.audit.trail import AuditTrail
from gateway.codecs.syntaxes import EXPLICIT_VR_LE
from gateway.config import Config

log = logging.getLogger("gateway.audit")
P = ParamSpec("P")

# PS3.15 A.5.3.2: a viewer reading a study (metadata) rather than moving its instances.
INSTANCES_ACCESSED: Code = ("110103", "DCM", "DICOM Instances Accessed")
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
# A query value that names no one and says how the query was scoped.
_KEPT_VRS = {"UI"}
_KEPT_KEYWORDS = {"QueryRetrieveLevel", "SpecificCharacterSet"}
_KEPT_PARAMETERS = {"limit", "offset", "includefield", "fuzzymatching"}


def audit_trail(config: Config) -> AuditTrail | None:
    """The audit trail ``[audit]`` asks for (None: none). Over TLS the node presents
    ``[dimse.tls]``'s certificate, as it does to peers, when one is configured."""
    if not config.audit.enabled:
        return None
    tls = config.dimse.tls.client_context() if config.dimse.tls is not None else None
    return AuditTrail(config.audit, config.audit.source_id or config.dimse.ae_title, tls)


class StudyTally:
    """Instances counted per study and SOP class, for one transfer's audit message."""

    def __init__(self) -> None:
        self._counts: dict[str, Counter[str]] = {}

    def add(self, study_uid: str, sop_class_uid: str, n: int = 1) -> None:
        self._counts.setdefault(study_uid, Counter())[sop_class_uid] += n

    def __bool__(self) -> bool:
        return bool(self._counts)

    def studies(self) -> tuple[StudyObject, ...]:
        return tuple(
            StudyObject(study, tuple(sorted((c, n) for c, n in classes.items() if c)))
            for study, classes in sorted(self._counts.items())
        )


def outcome_of(done: int, failed: int) -> int:
    """PS3.15's outcome for a transfer: all, some or none of it done."""
    if not failed:
        return SUCCESS
    return MINOR_FAILURE if done else SERIOUS_FAILURE


def blank_query(ds: Dataset) -> Dataset:
    """A C-FIND identifier with its keys as asked, UIDs and levels kept, every other
    value emptied (nested sequences too)."""
    out = Dataset()
    for elem in ds:
        if elem.VR == "SQ":
            out.add_new(elem.tag, "SQ", [blank_query(item) for item in elem.value or []])
        elif elem.VR in _KEPT_VRS or elem.keyword in _KEPT_KEYWORDS:
            out.add_new(elem.tag, elem.VR, elem.value)
        else:
            out.add_new(elem.tag, elem.VR, None)
    return out


def blank_query_string(query_string: str) -> bytes:
    """A QIDO-RS query string with its keys as asked and only the values of UID
    attributes (by keyword or tag, the last of a dotted path), paging and
    ``includefield`` kept."""
    kept = []
    for key, value in urllib.parse.parse_qsl(query_string, keep_blank_values=True):
        keep = key in _KEPT_PARAMETERS or _names_a_uid(key.rsplit(".", 1)[-1])
        kept.append((key, value if keep else ""))
    return urllib.parse.urlencode(kept, safe=",*").encode("ascii")


def _names_a_uid(key: str) -> bool:
    """Whether a QIDO-RS key (a keyword or eight hex digits) is an attribute of VR UI:
    by the attribute, never by what its value looks like (a patient ID may be digits)."""
    try:
        tag = int(key, 16) if len(key) == 8 else tag_for_keyword(key)
        return tag is not None and dictionary_VR(tag) == "UI"
    except (ValueError, KeyError):
        return False


def dimse_participant(ae_title: str, address: str, requestor: bool, user: str = "") -> Participant:
    """A DICOM node as PS3.15 names one: its AE title, also as ``AETITLES=``; ``user``:
    the person it acted for (User Identity Negotiation), as UserName."""
    return Participant(ae_title, requestor, address, alternative_user_id=f"AETITLES={ae_title}", user_name=user)


def archive_participant(config: Config) -> Participant | None:
    """The remote archive, as audit messages name it (it has no AE title): a DICOMweb
    archive by its URL, a HealthImaging datastore by its ID and region. None for the
    embedded archive, which is part of the gateway."""
    up = config.upstream
    if up.type == "dicomweb":
        return Participant(up.url, False, urllib.parse.urlsplit(up.url).hostname or "")
    if up.type == "healthimaging":
        host = urllib.parse.urlsplit(up.dicomweb_endpoint_url).hostname or ""
        return Participant(f"HealthImaging datastore {up.datastore_id} ({up.region})", False, host)
    return None


def web_participant(user: str, address: str | None) -> Participant:
    """A facade client: the credential it was admitted with, from its address."""
    return Participant(user, True, address or "")


def _never_raises(method: Callable[P, None]) -> Callable[P, None]:
    """An audit message that cannot be made is logged, never raised: the DICOM or
    HTTP operation it records has happened and must still be answered."""

    @functools.wraps(method)
    def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            method(*args, **kwargs)
        except Exception:  # noqa: BLE001 - see above
            log.exception("audit message (%s) not made", method.__name__)

    return guarded


class Auditor:
    """The gateway's side of every audit message, and the one place they are made."""

    def __init__(self, config: Config, trail: AuditTrail | None) -> None:
        self.trail = trail
        # What trails replaced by a reload sent, dropped and failed, so the metrics
        # count on across reloads.
        self.retired: Counter[str] = Counter()
        ae = config.dimse.ae_title
        host = config.dimse.host
        address = host if host not in ("", "0.0.0.0", "::") else socket.gethostname()
        self.me = Participant(str(os.getpid()), False, address, alternative_user_id=f"AETITLES={ae}", user_name=ae)
        self.archive = archive_participant(config)

    @property
    def enabled(self) -> bool:
        return self.trail is not None

    def _record(self, event: AuditEvent) -> None:
        trail = self.trail
        if trail is not None:
            trail.record(event)

    def swap(self, trail: AuditTrail | None) -> AuditTrail | None:
        """Send from now on to ``trail`` (``[audit]`` reloaded); returns the trail it
        replaces, which the caller closes (blocking: it drains) and then `retire`s."""
        old, self.trail = self.trail, trail
        return old

    def retire(self, trail: AuditTrail) -> None:
        """Keep a closed trail's counts for the metrics."""
        self.retired.update(sent=trail.sent, dropped=trail.dropped, failed=trail.failed)

    def counts(self) -> dict[str, int]:
        """Messages sent, dropped and failed since start, over every trail."""
        trail = self.trail
        return {
            result: self.retired[result] + (getattr(trail, result) if trail is not None else 0)
            for result in ("sent", "dropped", "failed")
        }

    @_never_raises
    def started(self) -> None:
        self._record(application_activity(True, self.me))

    @_never_raises
    def stopped(self) -> None:
        self._record(application_activity(False, self.me))

    @_never_raises
    def received(self, sender: Participant, tally: StudyTally, done: int, failed: int, description: str = "") -> None:
        """Instances the gateway took in (C-STORE on one association, one STOW-RS request)."""
        if done or failed:
            self._record(instances_transferred(
                "C", outcome_of(done, failed), sender, self.me, tally.studies(), description
            ))

    @_never_raises
    def sent(
        self, requestor: Participant, destination: Participant, tally: StudyTally, done: int, failed: int,
        description: str = "",
    ) -> None:
        """Instances the gateway sent (C-MOVE, C-GET, WADO-RS, WADO-URI). When the
        requestor is not the destination (C-MOVE), it is named too."""
        if not (done or failed):
            return
        event = instances_transferred("R", outcome_of(done, failed), self.me, destination, tally.studies(), description)
        if requestor.user_id != destination.user_id or requestor.address != destination.address:
            event = dataclasses.replace(event, participants=(*event.participants, requestor))
        self._record(event)

    @_never_raises
    def pushed(self, destination: Participant, tally: StudyTally, done: int, failed: int, description: str = "") -> None:
        """Instances the gateway sent of its own accord: delivered to the archive,
        copied by a route. The gateway is the source and the requestor."""
        if done or failed:
            self._record(instances_transferred(
                "R", outcome_of(done, failed), dataclasses.replace(self.me, requestor=True), destination,
                tally.studies(), description,
            ))

    @_never_raises
    def delivered(self, tally: StudyTally, done: int, refused: int) -> None:
        """A batch delivered to a remote archive (the embedded one is no transfer)."""
        if self.archive is not None:
            self.pushed(self.archive, tally, done, refused, "delivered to the archive")

    @_never_raises
    def accessed(self, reader: Participant, study_uid: str, ok: bool) -> None:
        """A study's metadata read through the facade (what a viewer opens)."""
        self._record(AuditEvent(
            INSTANCES_ACCESSED, "R", SUCCESS if ok else MINOR_FAILURE, (reader, self.me),
            (StudyObject(study_uid),),
        ))

    @_never_raises
    def searched(
        self, requestor: Participant, sop_class_uid: str, identifier: Dataset | None, ok: bool, description: str = ""
    ) -> None:
        """A C-FIND: its identifier kept with the values blanked (`blank_query`), in
        Explicit VR Little Endian (None: it could not be read)."""
        if self.trail is None:
            return
        blanked = b""
        if identifier is not None:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, blank_query(identifier))
            blanked = fp.getvalue()
        self.queried(requestor, sop_class_uid, blanked, ok, EXPLICIT_VR_LE, description)

    @_never_raises
    def queried(
        self, requestor: Participant, sop_class_uid: str, blanked: bytes, ok: bool, syntax: str = "", description: str = ""
    ) -> None:
        """A C-FIND (``blanked``: its identifier encoded in ``syntax``) or QIDO-RS
        (``blanked``: its query string, ``syntax`` empty)."""
        self._record(query(
            SUCCESS if ok else MINOR_FAILURE, requestor, self.me,
            QueryObject(sop_class_uid, blanked, syntax), description,
        ))

    @_never_raises
    def deleted(self, requestor: Participant, study_uid: str, ok: bool, description: str = "") -> None:
        self._record(study_deleted(SUCCESS if ok else SERIOUS_FAILURE, requestor, (StudyObject(study_uid),), description))

    @_never_raises
    def refused_login(self, user: Participant, why: str) -> None:
        self._record(authentication_failed(user, self.me, why))

    @_never_raises
    def refused_node(self, offender: Participant, why: str, tls: bool) -> None:
        """An association or TLS connection refused: a node that failed to
        authenticate (TLS), or asked for what it may not (an AE title or service)."""
        kind = NODE_AUTHENTICATION if tls else USE_OF_RESTRICTED_FUNCTION
        self._record(security_alert(kind, self.me, offender, why))


def ip_of(address: str) -> str:
    """The host part of ``host:port`` (IPv6 brackets removed), for NetworkAccessPointID."""
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        return str(ipaddress.ip_address(host.removeprefix("::ffff:")))
    except ValueError:
        return host


def tally_of(refs: Iterable[tuple[str, str]]) -> StudyTally:
    """A tally of (study UID, SOP class UID) pairs."""
    tally = StudyTally()
    for study, sop_class in refs:
        tally.add(study, sop_class)
    return tally
