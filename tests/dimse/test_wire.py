"""Command sets, PDU framing and the structural check of received data sets."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from gateway.dimse import pdu
from gateway.dimse.command import C_STORE_RQ, C_STORE_RSP, decode_command, encode_command, response
from gateway.structure import check_structure
from tests.support.corpus import pydicom_corpus, sample_items


def test_command_round_trip_and_response() -> None:
    raw = encode_command({0x0002: "1.2.840.10008.5.1.4.1.1.2", 0x0100: C_STORE_RQ, 0x0110: 7, 0x0700: 0, 0x0800: 1, 0x1000: "1.2.3"})
    cmd = decode_command(raw)
    assert cmd.field == C_STORE_RQ and cmd.message_id == 7 and cmd.has_dataset
    rsp = decode_command(response(cmd, C_STORE_RSP, 0xA700, extra={0x0902: "spool full"}))
    assert rsp.values[0x0120] == 7 and rsp.values[0x0900] == 0xA700
    assert rsp.values[0x1000] == "1.2.3" and rsp.values[0x0902] == "spool full"
    assert not rsp.has_dataset


def test_pdata_fragmentation_respects_peer_maximum() -> None:
    payload = bytes(range(256)) * 100
    pdus = pdu.encode_pdata(3, payload, False, max_pdu_length=4096)
    assert all(len(p) - 6 <= 4096 for p in pdus)
    body = b"".join(p[6:] for p in pdus)
    pdvs = pdu.parse_pdata(body)
    assert b"".join(bytes(f) for _, _, f in pdvs) == payload
    assert [c for _, c, _ in pdvs][-1] == 2 and all(c == 0 for _, c, _ in pdvs[:-1])


@pytest.mark.parametrize("body", [b"\x00" * 10, b"\x00\x01" + b"\x00" * 66 + b"\x20\x00\xff\xff"])
def test_malformed_associate_rq_raises(body: bytes) -> None:
    with pytest.raises(pdu.PDUError):
        pdu.parse_associate_rq(body)


def test_structure_accepts_every_corpus_file() -> None:
    for item in pydicom_corpus() + sample_items():
        data = item.path.read_bytes()
        start = data.index(b"DICM") + 4
        group_length = int.from_bytes(data[start + 8 : start + 12], "little")
        problem = check_structure(io.BytesIO(data), start + 12 + group_length, len(data), item.transfer_syntax_uid)
        assert problem is None, f"{item.path.name}: {problem}"


def test_structure_catches_truncation_anywhere(tmp_path: Path) -> None:
    item = next(i for i in pydicom_corpus() if i.path.name == "CT_small.dcm")
    data = item.path.read_bytes()
    start = data.index(b"DICM") + 4
    offset = start + 12 + int.from_bytes(data[start + 8 : start + 12], "little")
    for cut in (1, 7, 100, len(data) - offset - 20):
        short = data[:-cut]
        assert check_structure(io.BytesIO(short), offset, len(short), item.transfer_syntax_uid), cut

