"""Unit tests of the C-MOVE/C-GET building blocks: requestor PDUs, WADO multipart
reading (whole and streamed), File Meta parsing, retrieve identifiers, counts, context
proposals, the transcode memory budget, and the pipeline: bulk retrieval with its
one-by-one fallback, sending while the search still lists, a SOP class listed late, a
search cut short."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from gateway.config import Config, RetrieveConfig, SpoolConfig
from gateway.dicomweb.multipart_reader import (
    MultipartError,
    StreamedPart,
    boundary_of,
    iter_parts,
    single_part_in_file,
    split_parts,
)
from gateway.dimse import pdu
from gateway.dimse.association import file_meta_header
from gateway.dimse.command import Command
from gateway.dimse.requestor import DataSource, FileSlice
from gateway.dimse.retrieve import ByteBudget, Counts, Retriever, part10_file, proposals
from gateway.dimse.retrieve_request import InstanceRef, RetrieveError, RetrieveRequest, failure_status, parse_retrieve_identifier
from gateway.dimse.retrieve_sources import Fetched, Listing, part10_header
from gateway.upstream.base import Retrieved
from gateway.upstream.errors import NotFound, UpstreamAuthError, UpstreamUnavailable

CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG = "1.2.840.10008.1.2.4.50"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


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
    # A search that failed after sub-operations ran: never Success.
    assert Counts(total=5, completed=5).final_status(complete=False) == 0xB000
    assert Counts(total=5, warning=1).final_status(complete=False) == 0xB000
    c = Counts(total=1)
    c.fail("1")
    assert c.final_status(complete=False) == 0xA702


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


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _stream(body: bytes, size: int, spill_dir: Path, spill_bytes: int) -> tuple[list[StreamedPart], Exception | None]:
    async def collect() -> tuple[list[StreamedPart], Exception | None]:
        parts: list[StreamedPart] = []
        try:
            async for part in iter_parts(_chunks(body, size), "b0und", spill_dir, spill_bytes):
                parts.append(part)
        except MultipartError as exc:
            return parts, exc
        return parts, None

    return asyncio.run(collect())


def test_multipart_stream_hands_out_every_part_whatever_the_chunking(tmp_path: Path) -> None:
    """Parts split anywhere across chunks, near-delimiters inside the content, a part
    without headers, and one part above the spill size, which arrives as a file."""
    contents = [b"A" * 50 + b"\r\n--b0un" + b"--b0und" + b"B" * 30, b"small", bytes(range(256)) * 3]
    body = b"preamble\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\n" + contents[0]
    body += b"\r\n--b0und\r\n\r\n" + contents[1]
    body += b"\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\n" + contents[2] + b"\r\n--b0und--\r\n"
    for size in (1, 2, 5, 13, 64, 700, len(body)):
        spill_dir = tmp_path / f"spill-{size}"
        parts, error = _stream(body, size, spill_dir, 500)
        assert error is None
        got = [p.data if p.data is not None else p.path.read_bytes() for p in parts]  # type: ignore[union-attr]
        assert got == contents, size
        assert [p.length for p in parts] == [len(c) for c in contents]
        # a part that arrived within one chunk is in memory already: no point spilling it
        assert [p.path is not None for p in parts] == [False, False, size < 500], size
        assert parts[0].headers == {"content-type": "application/dicom"} and parts[1].headers == {}


def test_multipart_stream_cut_short_keeps_complete_parts_and_no_spill_file(tmp_path: Path) -> None:
    body = b"--b0und\r\n\r\nfirst\r\n--b0und\r\n\r\n" + b"x" * 2000
    parts, error = _stream(body, 100, tmp_path, 500)
    assert [p.data for p in parts] == [b"first"]
    assert isinstance(error, MultipartError)
    assert list(tmp_path.iterdir()) == []  # the half-received large part was deleted
    assert _stream(b"no delimiter at all", 4, tmp_path, 500)[1] is not None


# -- the pipeline: bulk first, then one by one -------------------------------------------

STUDY, SERIES = "1.2.3", "1.2.3.4"


def _instance(uid: str, sop_class: str = CT) -> bytes:
    """A Part 10 file whose data set (never parsed on the way) ends with its UID."""
    return file_meta_header(sop_class, uid, "1.2.840.10008.1.2.1", "SRC") + b"data set of " + uid.encode()


def _uid(value: str) -> dict[str, object]:
    return {"vr": "UI", "Value": [value]}


class FakeArchive:
    """Serves ``held`` instances; the bulk answer brings ``bulk`` UIDs (in that order,
    unknown and repeated ones included) and then fails when ``bulk_fails``. The search
    lists ``listed`` (one page of ``page`` at a time, each after the bulk answer has
    moved on by ``page`` instances, so sending starts before the search ends; with
    ``pages_after_open`` the later pages wait for the first receiver to be opened), and
    fails after them when ``search_fails``. ``classes`` gives a UID another SOP class."""

    def __init__(
        self, held: list[str], bulk: list[str], bulk_fails: bool, listed: list[str] | None = None,
        classes: dict[str, str] | None = None, page: int = 10, search_fails: bool = False,
        pages_after_open: bool = False,
    ) -> None:
        self.held, self.bulk, self.bulk_fails = held, bulk, bulk_fails
        self.listed = list(held if listed is None else listed)
        self.classes = classes or {}
        self.page, self.search_fails = page, search_fails
        self.alone: list[str] = []
        self.bulk_sent = 0
        self.listed_before_sending: int | None = None
        self.pages_after_open = pages_after_open
        self.opened = asyncio.Event()

    def sop_class(self, uid: str) -> str:
        return self.classes.get(uid, CT)

    async def search_for_instances(self, search) -> AsyncIterator[dict[str, object]]:  # type: ignore[no-untyped-def]
        for start in range(0, len(self.listed), self.page):
            while self.bulk_sent < min(start, len(self.bulk)):
                await asyncio.sleep(0)
            if start and self.pages_after_open:
                await self.opened.wait()
            for uid in self.listed[start : start + self.page]:
                yield {"0020000D": _uid(STUDY), "0020000E": _uid(SERIES), "00080018": _uid(uid), "00080016": _uid(self.sop_class(uid))}
        if self.search_fails:
            raise UpstreamUnavailable("search connection reset")

    async def retrieve_instance(self, study: str, series: str, uid: str, spill_dir: Path, spill_bytes: int, *, acceptable: Sequence[str]) -> Retrieved:
        self.alone.append(uid)
        if uid not in self.held:
            raise NotFound("gone")
        data = _instance(uid, self.sop_class(uid))
        return Retrieved(data, None, 0, len(data))

    async def iter_instances(self, study: str, series: str | None, spill_dir: Path, spill_bytes: int) -> AsyncIterator[Retrieved]:
        for uid in self.bulk:
            data = _instance(uid, self.sop_class(uid))
            self.bulk_sent += 1
            yield Retrieved(data, None, 0, len(data))
        if self.bulk_fails:
            raise UpstreamUnavailable("connection reset")


class FakeReceiver:
    """One association: asked for ``classes`` (every class when None)."""

    def __init__(self, classes: set[str] | None = None) -> None:
        self.classes = classes
        self.stored: list[str] = []

    def syntaxes(self, sop_class_uid: str) -> dict[str, int]:
        return {"1.2.840.10008.1.2.1": 1} if self.offered(sop_class_uid) else {}

    def offered(self, sop_class_uid: str) -> bool:
        return self.classes is None or sop_class_uid in self.classes

    async def send(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DataSource) -> Command:
        assert not isinstance(dataset, FileSlice) and bytes(dataset) == b"data set of " + sop_instance_uid.encode()
        assert self.offered(sop_class_uid)
        self.stored.append(sop_instance_uid)
        return Command({0x0100: 0x8001, 0x0900: 0})


def _retrieve(
    tmp_path: Path, archive: FakeArchive, per_class: bool = False, level: str = "SERIES"
) -> tuple[Counts, list[FakeReceiver], Listing]:
    """Run a retrieval; with ``per_class`` each opened receiver is asked only for the
    SOP classes proposals() would offer it, as a C-MOVE destination would be."""
    config = Config(spool=replace(SpoolConfig(), directory=tmp_path), retrieve=RetrieveConfig(fetch_concurrency=2))
    receivers: list[FakeReceiver] = []

    async def go() -> tuple[Counts, Listing]:
        retriever = Retriever(config, archive)  # type: ignore[arg-type]
        request = RetrieveRequest(level, study_uids=(STUDY,), series_uids=(SERIES,))
        feed = retriever.bulk(request, "test")
        assert feed is not None
        listing = Listing(retriever, request)

        async def open_target(first: list[Fetched], refs: list[InstanceRef]) -> FakeReceiver:
            if archive.listed_before_sending is None:
                archive.listed_before_sending = len(listing.refs)
            archive.opened.set()
            receivers.append(FakeReceiver({sop for sop, _ in proposals(refs, first)} if per_class else None))
            return receivers[-1]

        async def report(counts: Counts) -> None:
            assert listing.done and counts.total == len(listing.refs)

        try:
            return await retriever.run(listing, open_target, report, asyncio.Event(), "test", feed), listing
        finally:
            await listing.close()
            await feed.close()
            retriever.close()

    counts, listing = asyncio.run(go())
    return counts, receivers, listing


def test_bulk_answer_delivers_every_instance_without_single_fetches(tmp_path: Path) -> None:
    """Sending starts before the search has listed everything, and nothing goes alone."""
    uids = [f"9.{i}" for i in range(1, 201)]
    archive = FakeArchive(uids, uids, bulk_fails=False)
    counts, [receiver], _ = _retrieve(tmp_path, archive)
    assert (counts.total, counts.completed, counts.failed, counts.bulk) == (200, 200, 0, 200)
    assert receiver.stored == uids and archive.alone == []
    assert archive.listed_before_sending is not None and archive.listed_before_sending < 200


def test_bulk_answer_cut_short_is_completed_one_by_one(tmp_path: Path) -> None:
    """The bulk answer brings a stranger, a repeat and part of the list, then fails: the
    rest is fetched alone, the one the archive no longer has fails, nothing goes twice."""
    uids = [f"9.{i}" for i in range(1, 21)]
    archive = FakeArchive(uids[:-1], ["9.99", *uids[:5], uids[2]], bulk_fails=True, listed=uids)
    counts, [receiver], _ = _retrieve(tmp_path, archive)
    assert sorted(receiver.stored) == sorted(uids[:-1]) and len(receiver.stored) == 19
    assert archive.alone == uids[5:]
    assert (counts.completed, counts.failed, counts.failed_uids, counts.bulk) == (19, 1, [uids[-1]], 5)


def test_sop_class_listed_after_the_association_opened_goes_over_a_second_one(tmp_path: Path) -> None:
    """CT first, then SR instances the search lists only after the first receiver was
    opened: the CT go over it as they arrive, the SR (fetched again) over a second one
    asked for the SR class, and every instance is sent once."""
    ct = [f"9.{i}" for i in range(1, 101)]
    sr = ["9.500", "9.501"]
    uids = ct + sr
    archive = FakeArchive(uids, uids, bulk_fails=False, classes=dict.fromkeys(sr, SR), page=100, pages_after_open=True)
    counts, receivers, _ = _retrieve(tmp_path, archive, per_class=True)
    assert [r.classes for r in receivers] == [{CT}, {SR}]
    assert receivers[0].stored == ct and receivers[1].stored == sr
    assert (counts.total, counts.completed, counts.failed, counts.final_status()) == (102, 102, 0, 0x0000)
    assert archive.alone == sr


def test_one_sop_class_one_receiver(tmp_path: Path) -> None:
    uids = [f"9.{i}" for i in range(1, 151)]
    counts, receivers, _ = _retrieve(tmp_path, FakeArchive(uids, uids, bulk_fails=False), per_class=True)
    assert len(receivers) == 1 and counts.completed == 150


def test_search_failing_after_sending_began_accounts_for_what_it_listed(tmp_path: Path) -> None:
    """The search breaks after its first pages: what it listed is sent, the engine ends
    without waiting for more, and the listing keeps the error for the final status."""
    uids = [f"9.{i}" for i in range(1, 101)]
    archive = FakeArchive(uids, uids, bulk_fails=False, listed=uids[:30], search_fails=True)
    counts, [receiver], listing = _retrieve(tmp_path, archive)
    assert isinstance(listing.error, UpstreamUnavailable)
    assert (counts.total, counts.completed, counts.failed) == (30, 30, 0)
    assert receiver.stored == uids[:30]


def test_search_failing_before_anything_is_sent_raises(tmp_path: Path) -> None:
    archive = FakeArchive([], ["9.1"], bulk_fails=False, listed=[], search_fails=True)
    with pytest.raises(UpstreamUnavailable):
        _retrieve(tmp_path, archive)


def test_bulk_only_for_studies_and_series_of_a_named_study(tmp_path: Path) -> None:
    config = Config(spool=replace(SpoolConfig(), directory=tmp_path))

    async def scopes() -> list[bool]:
        retriever = Retriever(config, FakeArchive([], [], False))  # type: ignore[arg-type]
        out = []
        for request in (
            RetrieveRequest("STUDY", study_uids=(STUDY,)),
            RetrieveRequest("SERIES", study_uids=(STUDY,), series_uids=(SERIES,)),
            RetrieveRequest("SERIES", series_uids=(SERIES,)),
            RetrieveRequest("IMAGE", study_uids=(STUDY,), series_uids=(SERIES,), sop_uids=("9.1",)),
            RetrieveRequest("PATIENT", patient_id="P1"),
        ):
            feed = retriever.bulk(request, "test")
            out.append(feed is not None)
            if feed is not None:
                await feed.close()
        retriever.close()
        return out

    assert asyncio.run(scopes()) == [True, True, False, False, False]


def test_byte_budget_grants_in_order_and_a_large_one_alone() -> None:
    """Transcodes wait until their estimate fits, in order of asking (a small one does
    not overtake a large one waiting); one larger than the budget runs alone; a
    cancelled waiter gives up its place."""

    async def go() -> list[str]:
        budget = ByteBudget(100)
        order: list[str] = []

        async def job(name: str, size: int, hold: asyncio.Event) -> None:
            held = await budget.acquire(size)
            order.append(name)
            await hold.wait()
            budget.release(held)

        first, big, small, cancelled = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(job("first", 60, first))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("big", 500, big)))  # more than the budget
        await asyncio.sleep(0)
        doomed = asyncio.create_task(job("cancelled", 10, cancelled))
        tasks.append(asyncio.create_task(job("small", 30, small)))
        await asyncio.sleep(0)
        assert order == ["first"] and budget.held == 60  # small fits, but waits its turn
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
        first.set()
        await asyncio.sleep(0.01)
        assert order == ["first", "big"] and budget.held == 100  # alone
        big.set()
        await asyncio.sleep(0.01)
        assert budget.held == 30
        small.set()
        await asyncio.gather(*tasks)
        assert budget.held == 0
        return order

    assert asyncio.run(go()) == ["first", "big", "small"]


def test_part10_file_is_bounded_to_the_instance(tmp_path: Path) -> None:
    """A retrieved instance inside a larger answer reads as a file of its own."""
    body = b"--boundary\r\n" + b"0123456789" + b"\r\n--boundary--"
    spill = tmp_path / "answer"
    spill.write_bytes(body)
    for retrieved in (Retrieved(body, None, 12, 10), Retrieved(None, spill, 12, 10)):
        with part10_file(retrieved) as fp:
            assert fp.read() == b"0123456789"
            fp.seek(4)
            assert fp.read(3) == b"456"
            fp.seek(-2, 2)
            assert fp.read(10) == b"89"
