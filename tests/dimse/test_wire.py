"""Command sets, PDU framing and the structural check of received data sets."""

from __future__ import annotations

import io
import struct
import pydicom
import pytest
from gateway.dimse import pdu
from gateway.dimse.command import C_STORE_RQ, C_STORE_RSP, decode_command, encode_command, response
import gateway.structure
from gateway.header import Unreadable, read_header
from gateway.structure import scan_file
from tests.support.deflated import deflated_instance
from tests.support.nested import nested_instance
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


def test_scan_accepts_every_corpus_file_and_reads_its_uids() -> None:
    for item in pydicom_corpus(dcmtk_only=False) + sample_items():
        data = item.path.read_bytes()
        scan = scan_file(io.BytesIO(data), len(data), frozenset({0x00080018}))
        assert scan.problem is None, f"{item.path.name}: {scan.problem}"
        assert scan.transfer_syntax == item.transfer_syntax_uid
        assert scan.values[0x00080018] == item.sop_instance_uid, item.path.name  # deflated ones inflated


@pytest.mark.parametrize("window", [12, 13, 37, 4096])
def test_scan_reads_the_same_through_any_window(monkeypatch, window: int) -> None:  # type: ignore[no-untyped-def]
    """The walk unpacks element headers from a window of the file. Small windows put
    headers across every window edge: each corpus file, whole and cut short, is read
    as through the default window, the problems included."""
    files = pydicom_corpus(dcmtk_only=False) + sample_items()
    expected = {}
    for item in files:
        data = item.path.read_bytes()
        for size in (len(data), len(data) * 2 // 3):
            scan = scan_file(io.BytesIO(data[:size]), size, KEEP_SOP)
            expected[item.path.name, size] = (scan.problem, scan.values, scan.dataset_offset)
    monkeypatch.setattr(gateway.structure, "WINDOW", window)
    for (name, size), want in expected.items():
        data = next(i for i in files if i.path.name == name).path.read_bytes()
        scan = scan_file(io.BytesIO(data[:size]), size, KEEP_SOP)
        assert (scan.problem, scan.values, scan.dataset_offset) == want, (name, size)


def test_scan_catches_truncation_inside_values() -> None:
    """A cut inside a value or a header is caught; a cut exactly between two elements
    leaves a well-formed (shorter) data set, which no structural check can see."""
    item = next(i for i in pydicom_corpus() if i.path.name == "CT_small.dcm")
    data = item.path.read_bytes()
    for cut in range(1, 128 * 128 * 2, 509):  # inside the 32 KB of pixel data
        short = data[:-cut]
        assert scan_file(io.BytesIO(short), len(short), frozenset()).problem, cut
    short = data[:200]  # inside the file meta
    assert scan_file(io.BytesIO(short), len(short), frozenset()).problem


def test_scan_refuses_files_without_dicom_prefix() -> None:
    data = b"\x00" * 200
    assert scan_file(io.BytesIO(data), len(data), frozenset()).problem == "no DICM prefix"


def test_unsupported_command_gets_0211_not_an_abort(tmp_path) -> None:
    """An N-GET (a service we do not offer) on an accepted context: answered with
    Unrecognized Operation."""
    import asyncio

    from gateway.config import parse_config
    from gateway.dimse.association import AcceptedContext, Message
    from gateway.dimse.command import Command
    from gateway.dimse.server import DimseServer

    sent: list[bytes] = []

    class FakeAssoc:
        peer = "X@127.0.0.1:1"

        async def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
            sent.append(command)

        def dispatch(self, message, handler) -> None:
            self.task = asyncio.ensure_future(handler(self, message))

    async def main() -> None:
        server = DimseServer(parse_config({}), None, {}, {})
        assoc = FakeAssoc()
        message = Message(AcceptedContext(1, "1.2.840.10008.1.1", "1.2.840.10008.1.2"), Command({0x0100: 0x0110, 0x0110: 5}))
        server._route(assoc, message)  # type: ignore[arg-type]
        await assoc.task

    asyncio.run(main())
    rsp = decode_command(sent[0])
    assert rsp.field == 0x8110 and rsp.values[0x0900] == 0x0211 and rsp.values[0x0120] == 5


KEEP_SOP = frozenset({0x00080018})


def test_a_deflated_data_set_is_inflated_as_it_is_walked_up_to_a_bound(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, uid = deflated_instance(3 << 20)  # 3 MiB of zeros, a few kilobytes deflated
    assert len(data) < 10_000
    scan = scan_file(io.BytesIO(data), len(data), KEEP_SOP)
    assert scan.problem is None and scan.values[0x00080018] == uid
    monkeypatch.setattr(gateway.structure, "MAX_INFLATED", 2 << 20)
    scan = scan_file(io.BytesIO(data), len(data), KEEP_SOP)
    assert scan.oversized and scan.problem == "deflated data set inflates beyond 2 MiB"
    path = tmp_path / "bomb.dcm"
    path.write_bytes(data)
    with pytest.raises(Unreadable, match="^deflated data set inflates beyond 2 MiB$"):  # said as it is, not "malformed"
        read_header(path, None, None)


def test_a_deflated_data_set_cut_short_or_corrupt_is_malformed() -> None:
    data, _ = deflated_instance(100_000)
    start = scan_file(io.BytesIO(data), len(data), KEEP_SOP).dataset_offset
    corrupt = data[:start] + b"\xff" * 16 + data[start + 16 :]  # a reserved deflate block type
    for broken, problem in ((data[:-50], "deflated data set cut short"), (corrupt, "deflated data set does not inflate")):
        assert scan_file(io.BytesIO(broken), len(broken), KEEP_SOP).problem == problem


@pytest.mark.parametrize("encoding", ["undefined", "defined", "implicit"])
def test_sequences_nested_past_the_bound_are_refused_by_name(encoding: str) -> None:
    """Sequences nested 32 deep are taken and read by pydicom; 33 or 5000 deep are
    refused with the reason, in every encoding. Before, an undefined-length nesting of
    a few hundred was refused as "unreadable (RecursionError)", and a defined-length
    one was stored, after which the facade answered its study's metadata with a 500."""
    data, sop, _, _ = nested_instance(gateway.structure.MAX_NESTING, encoding)
    scan = scan_file(io.BytesIO(data), len(data), KEEP_SOP)
    assert scan.problem is None and scan.values[0x00080018] == sop
    assert pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID == sop
    for depth in (gateway.structure.MAX_NESTING + 1, 5000):
        data, _, _, _ = nested_instance(depth, encoding)
        scan = scan_file(io.BytesIO(data), len(data), KEEP_SOP)
        assert scan.oversized and scan.problem == "sequences nested deeper than 32 levels", (depth, scan.problem)


def test_a_defined_length_sequence_holding_no_items_is_skipped_as_before() -> None:
    """Implicit VR: (0008,1140) is a sequence by the dictionary, and a sender filled it
    with 40 bytes that are no items. pydicom reads such a value only when asked, and
    the check skipped defined-length sequences before it walked into them for their
    depth: the instance is taken, as it was. A data set cut inside such a sequence is
    still refused."""
    data, sop, _, _ = nested_instance(1, "implicit")
    junk = struct.pack("<HHI", 0x0008, 0x1140, 40) + b"\x01\x02\x03\x04" * 10
    # (0008,1140) sorts after (0008,0060) Modality and before (0020,000D)
    at = data.index(struct.pack("<HH", 0x0020, 0x000D))
    with_junk = data[:at] + junk + data[at:]
    scan = scan_file(io.BytesIO(with_junk), len(with_junk), KEEP_SOP)
    assert scan.problem is None and scan.values[0x00080018] == sop
    cut = with_junk[: at + 20]
    assert scan_file(io.BytesIO(cut), len(cut), KEEP_SOP).problem == "a value runs past the end of the data set"
