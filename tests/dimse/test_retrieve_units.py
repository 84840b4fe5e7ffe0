"""Unit tests of the DIMSE side of C-MOVE/C-GET: requestor PDUs, retrieve identifiers, statuses from the counts and from
errors, context proposals, and the C-STORE receivers as the engine sees them. The
engine itself is tested in tests/retrieval."""

from __future__ import annotations

import asyncio

import pytest
from pydicom.dataset import Dataset

from gateway.dimse import pdu
from gateway.dimse.command import Command
from gateway.dimse.requestor import RequestorError
from gateway.dimse.retrieve import (
    NO_CONTEXT,
    NO_SOP_CLASS,
    StoreSubOperations,
    command_fields,
    final_status,
    proposals,
    store_delivery,
)
from gateway.dimse.retrieve_request import RetrieveError, failure_status, parse_retrieve_identifier
from gateway.retrieval.engine import Counts, Delivery, Outcome, TargetLost
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.source import DataSource, Fetched
from gateway.upstream.errors import UpstreamAuthError, UpstreamUnavailable

CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG = "1.2.840.10008.1.2.4.50"


def test_associate_rq_round_trips_through_the_acceptor_parser() -> None:
    contexts = [pdu.PresentationContextRQ(1, CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]
    raw = pdu.encode_associate_rq("DEST", "DICOMGW", contexts, 65536, "1.2.3", "GW", [pdu.RoleSelection(CT, False, True)])
    rq = pdu.parse_associate_rq(raw[6:])
    assert (rq.called_ae, rq.calling_ae, rq.max_pdu_length) == ("DEST", "DICOMGW", 65536)
    assert rq.contexts[0].transfer_syntaxes == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert rq.roles == [pdu.RoleSelection(CT, False, True)]


def test_associate_ac_and_rj_parse() -> None:
    rq = pdu.AssociateRQ("DEST", "DICOMGW")
    raw = pdu.encode_associate_ac(rq, [pdu.PresentationContextAC(1, 0, JPEG), pdu.PresentationContextAC(3, 4, "")], 16384, "1.2.3", "X")
    ac = pdu.parse_associate_ac(raw[6:])
    assert [(c.id, c.result, c.transfer_syntax) for c in ac.contexts] == [(1, 0, JPEG), (3, 4, "")]
    assert ac.max_pdu_length == 16384
    assert pdu.parse_associate_rj(pdu.encode_associate_rj(1, 1, 3)[6:]) == (1, 1, 3)
    with pytest.raises(ValueError):
        pdu.encode_associate_rq("A", "B", [], 0, "1", "x")


def _identifier(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_retrieve_identifier_levels() -> None:
    req = parse_retrieve_identifier(_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=["1.2", "1.3", "1.2"]), True)
    assert req.study_uids == ("1.2", "1.3")  # each once: read in bulk and counted once
    req = parse_retrieve_identifier(_identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.1", SOPInstanceUID="1.2.1.1"), True)
    assert (req.level, req.sop_uids) == ("IMAGE", ("1.2.1.1",))
    assert parse_retrieve_identifier(_identifier(QueryRetrieveLevel="PATIENT", PatientID="P1"), False).patient_id == "P1"
    for bad, root in [
        (_identifier(QueryRetrieveLevel="PATIENT", PatientID="P1"), True),  # Study Root has no PATIENT level
        (_identifier(QueryRetrieveLevel="STUDY"), True),
        (_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="1.2/../x"), True),
        (_identifier(QueryRetrieveLevel="PATIENT", PatientID="P*"), False),
    ]:
        with pytest.raises(RetrieveError) as err:
            parse_retrieve_identifier(bad, root)
        assert err.value.status == 0xA900


def test_final_status_and_counts() -> None:
    assert final_status(Counts(total=3, completed=3)) == 0x0000
    c = Counts(total=3, completed=2)
    c.fail("1.2")
    assert (final_status(c), c.remaining, c.failed_uids) == (0xB000, 0, ["1.2"])
    c = Counts(total=2)
    c.fail("1"), c.fail("2")
    assert final_status(c) == 0xA702
    assert final_status(Counts(total=2, completed=1, warning=1)) == 0xB000
    assert command_fields(Counts(total=5, completed=2), True)[0x1020] == 3
    # A search that failed after sub-operations ran: never Success.
    assert final_status(Counts(total=5, completed=5), complete=False) == 0xB000
    assert final_status(Counts(total=5, warning=1), complete=False) == 0xB000
    c = Counts(total=1)
    c.fail("1")
    assert final_status(c, complete=False) == 0xA702


def test_only_unexpected_errors_are_internal() -> None:
    """The traceback of a refused request is logged for our faults only, decided by
    type (not by the comment's wording)."""
    assert failure_status(RuntimeError("bug")) == (0xC000, "internal error (RuntimeError)", True)
    for known in (RetrieveError("bad", 0xA900), UpstreamAuthError("401"), UpstreamUnavailable("down"), TimeoutError()):
        assert not failure_status(known).internal, known


def test_proposals_cover_uncompressed_and_stored_syntaxes() -> None:
    refs = [InstanceRef("1", "2", "3", CT), InstanceRef("1", "2", "4", "1.2.840.10008.5.1.4.1.1.7")]
    first = [Fetched(refs[0], transfer_syntax=JPEG, sop_class_uid=CT)]
    out = proposals(refs, first)
    assert (CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]) in out
    assert (CT, [JPEG]) in out
    assert ("1.2.840.10008.5.1.4.1.1.7", [JPEG]) not in out
    many = [InstanceRef("1", "2", str(i), f"1.2.840.10008.5.1.4.1.1.{i}") for i in range(200)]
    assert len(proposals(many, [])) == 128


# -- the C-STORE receivers, as the engine sees them --------------------------------------


def test_c_store_statuses_become_outcomes() -> None:
    """PS3.4 B.2.3: Success completed; 0xB000, 0xB006, 0xB007 warnings; anything else
    (including a response without a status) failed, naming the status."""
    assert store_delivery(Command({0x0100: 0x8001, 0x0900: 0})) == Delivery(Outcome.COMPLETED)
    for warning in (0xB000, 0xB006, 0xB007):
        assert store_delivery(Command({0x0100: 0x8001, 0x0900: warning})) == Delivery(Outcome.WARNING)
    assert store_delivery(Command({0x0100: 0x8001, 0x0900: 0xA700})) == Delivery(
        Outcome.FAILED, "receiver answered C-STORE status 0xA700"
    )
    assert store_delivery(Command({0x0100: 0x8001})).outcome is Outcome.FAILED


class ScriptedAssociation(StoreSubOperations):
    """Asked for CT, accepting it in one syntax on context 3; stores answer ``status``,
    or raise RequestorError when ``status`` is None."""

    def __init__(self, status: int | None) -> None:
        self.status = status
        self.sent: list[tuple[int, str, str]] = []

    def contexts(self, sop_class_uid: str) -> dict[str, int]:
        return {"1.2.840.10008.1.2.1": 3} if sop_class_uid == CT else {}

    def asked(self, sop_class_uid: str) -> bool:
        return sop_class_uid == CT

    async def store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DataSource) -> Command:
        if self.status is None:
            raise RequestorError("association lost: ConnectionResetError")
        self.sent.append((context_id, sop_class_uid, sop_instance_uid))
        return Command({0x0100: 0x8001, 0x0900: self.status})


def test_store_sub_operations_speak_the_engine_s_terms() -> None:
    """The syntax the engine picks goes out on its context; a lost association is
    TargetLost with the requestor's reason; an instance naming no SOP class is not set
    aside for another association (none could carry it) but refused with NO_SOP_CLASS."""
    target = ScriptedAssociation(0xB007)
    assert target.syntaxes(CT) == ["1.2.840.10008.1.2.1"] and target.syntaxes("") == []
    assert asyncio.run(target.send(CT, "1.2.3", "1.2.840.10008.1.2.1", b"x")).outcome is Outcome.WARNING
    assert target.sent == [(3, CT, "1.2.3")]
    with pytest.raises(TargetLost, match="association lost: ConnectionResetError"):
        asyncio.run(ScriptedAssociation(None).send(CT, "1.2.3", "1.2.840.10008.1.2.1", b"x"))
    assert (target.offered(CT), target.offered("1.2.840.10008.5.1.4.1.1.7"), target.offered("")) == (True, False, True)
    assert (target.refusal(""), target.refusal("1.2.840.10008.5.1.4.1.1.7")) == (NO_SOP_CLASS, NO_CONTEXT)
