"""Unit tests of the C-MOVE/C-GET building blocks: requestor PDUs, WADO multipart
reading, File Meta parsing, retrieve identifiers, counts and context proposals."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from gateway.dicomweb.multipart_reader import MultipartError, boundary_of, single_part_in_file, split_parts
from gateway.dimse import pdu
from gateway.dimse.association import file_meta_header
from gateway.dimse.retrieve import (
    Counts,
    Fetched,
    InstanceRef,
    RetrieveError,
    parse_retrieve_identifier,
    part10_header,
    proposals,
)

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


def test_multipart_single_part_in_memory_and_in_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    content_type = 'multipart/related; type="application/dicom"; boundary="b0und"'
    payload = b"DICM\r\n--not-it\r\n" * 100
    body = b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--b0und--\r\n"
    boundary = boundary_of(content_type)
    [span] = split_parts(body, boundary)
    assert body[span.offset : span.offset + span.length] == payload
    assert span.headers["content-type"] == "application/dicom"
    path = tmp_path / "body"
    path.write_bytes(body)
    in_file = single_part_in_file(path, boundary)
    assert (in_file.offset, in_file.length) == (span.offset, span.length)
    with pytest.raises(MultipartError):
        split_parts(b"--b0und\r\n\r\nunterminated", boundary)


def test_part10_header_finds_syntax_and_data_set_start() -> None:
    head = file_meta_header(CT, "1.2.3.4", JPEG, "SRC") + b"\x08\x00\x05\x00CS"
    assert part10_header(head) == (JPEG, CT, "1.2.3.4", len(head) - 6)
    with pytest.raises(ValueError):
        part10_header(b"\x00" * 200)


def _identifier(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_retrieve_identifier_levels() -> None:
    req = parse_retrieve_identifier(_identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=["1.2", "1.3"]), True)
    assert req.study_uids == ("1.2", "1.3")
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
    assert Counts(total=3, completed=3).final_status() == 0x0000
    c = Counts(total=3, completed=2)
    c.fail("1.2")
    assert (c.final_status(), c.remaining, c.failed_uids) == (0xB000, 0, ["1.2"])
    c = Counts(total=2)
    c.fail("1"), c.fail("2")
    assert c.final_status() == 0xA702
    assert Counts(total=2, completed=1, warning=1).final_status() == 0xB000
    assert Counts(total=5, completed=2).command_fields(True)[0x1020] == 3


def test_proposals_cover_uncompressed_and_stored_syntaxes() -> None:
    refs = [InstanceRef("1", "2", "3", CT), InstanceRef("1", "2", "4", "1.2.840.10008.5.1.4.1.1.7")]
    first = [Fetched(refs[0], transfer_syntax=JPEG, sop_class_uid=CT)]
    out = proposals(refs, first)
    assert (CT, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]) in out
    assert (CT, [JPEG]) in out
    assert ("1.2.840.10008.5.1.4.1.1.7", [JPEG]) not in out
    many = [InstanceRef("1", "2", str(i), f"1.2.840.10008.5.1.4.1.1.{i}") for i in range(200)]
    assert len(proposals(many, [])) == 128
