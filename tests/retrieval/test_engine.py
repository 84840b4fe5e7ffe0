"""Unit tests of the retrieval engine with a scripted archive and receiver: bulk
answers checked against the archive's count (no instance search when they are whole),
the one-by-one fallback when they fall short, a SOP class seen late (a study's found
by a search for its series), a search cut short, what the receiver answers (completed,
warning, failed, gone), cancellation, and the release of every fetched instance on
every path."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from gateway.config import Config, RetrieveConfig, SpoolConfig
from gateway.part10 import file_meta_header
from gateway.dimse.retrieve import final_status
from gateway.retrieval.engine import Counts, Delivery, Outcome, Retriever, TargetLost
from gateway.retrieval.listing import Listing
from gateway.retrieval.request import InstanceRef, RetrieveRequest
from gateway.retrieval.source import DataSource, Fetched, FileSlice
from gateway.spill import SpillArea
from gateway.upstream.base import Capabilities, Retrieved
from gateway.upstream.errors import NotFound, UpstreamUnavailable

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
STUDY, SERIES = "1.2.3", "1.2.3.4"


def _ui(tag: int, value: str) -> bytes:
    """One explicit VR little endian UI element."""
    raw = value.encode() + (b"\0" if len(value) % 2 else b"")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(raw)) + raw


def _dataset(uid: str) -> bytes:
    """A data set of the study and series every instance here belongs to, ending with its
    own UID (the engine checks the elements, and what study and series they name)."""
    return _ui(0x0020000D, STUDY) + _ui(0x0020000E, SERIES) + _ui(0x00200052, uid)


def _instance(uid: str, sop_class: str = CT) -> bytes:
    return file_meta_header(sop_class, uid, "1.2.840.10008.1.2.1", "SRC") + _dataset(uid)


def _uid(value: str) -> dict[str, object]:
    return {"vr": "UI", "Value": [value]}


@dataclass
class Tracked(Retrieved):
    """A retrieved instance that records its release in ``released``."""

    released: set[int] | None = None

    def release(self) -> None:
        assert self.released is not None
        self.released.add(id(self))
        super().release()


class FakeArchive:
    """Serves ``held`` instances; the bulk answer brings ``bulk`` UIDs (in that order,
    unknown and repeated ones included) and then fails when ``bulk_fails``. A study or
    series search says it holds ``count`` instances (nothing when None). The instance
    search lists ``listed`` (one page of ``page`` at a time) and fails after them when
    ``search_fails``; it is counted in ``searches``. ``classes`` gives a UID another
    SOP class. Every instance handed out is kept in ``handed`` and records its release."""

    capabilities = Capabilities()

    def __init__(
        self, held: list[str], bulk: list[str], bulk_fails: bool, listed: list[str] | None = None,
        classes: dict[str, str] | None = None, page: int = 10, search_fails: bool = False,
        count: int | None = None,
    ) -> None:
        self.held, self.bulk, self.bulk_fails = held, bulk, bulk_fails
        self.listed = list(held if listed is None else listed)
        self.classes = classes or {}
        self.page, self.search_fails = page, search_fails
        self.count = count
        self.searches: list[object] = []
        self.alone: list[str] = []
        self.handed: list[Tracked] = []
        self.released: set[int] = set()

    def sop_class(self, uid: str) -> str:
        return self.classes.get(uid, CT)

    def _hand(self, uid: str) -> Tracked:
        data = _instance(uid, self.sop_class(uid))
        self.handed.append(Tracked(data, None, 0, len(data), released=self.released))
        return self.handed[-1]

    def unreleased(self) -> int:
        return sum(1 for r in self.handed if id(r) not in self.released)

    async def _counted(self, key: str, count_key: str) -> AsyncIterator[dict[str, object]]:
        if self.count is not None:
            yield {key: _uid(STUDY if key == "0020000D" else SERIES), count_key: {"vr": "IS", "Value": [self.count]}}

    def search_for_studies(self, search) -> AsyncIterator[dict[str, object]]:  # type: ignore[no-untyped-def]
        return self._counted("0020000D", "00201208")

    def search_for_series(self, search) -> AsyncIterator[dict[str, object]]:  # type: ignore[no-untyped-def]
        return self._counted("0020000E", "00201209")

    async def search_for_instances(self, search) -> AsyncIterator[dict[str, object]]:  # type: ignore[no-untyped-def]
        self.searches.append(search)
        for start in range(0, len(self.listed), self.page):
            await asyncio.sleep(0)
            for uid in self.listed[start : start + self.page]:
                yield {"0020000D": _uid(STUDY), "0020000E": _uid(SERIES), "00080018": _uid(uid), "00080016": _uid(self.sop_class(uid))}
        if self.search_fails:
            raise UpstreamUnavailable("search connection reset")

    async def retrieve_instance(self, study: str, series: str, uid: str, spill_area: SpillArea, spill_bytes: int, *, acceptable: Sequence[str]) -> Retrieved:
        self.alone.append(uid)
        if uid not in self.held:
            raise NotFound("gone")
        return self._hand(uid)

    async def iter_instances(self, study: str, series: str | None, spill_area: SpillArea, spill_bytes: int) -> AsyncIterator[Retrieved]:
        for uid in self.bulk:
            yield self._hand(uid)
        if self.bulk_fails:
            raise UpstreamUnavailable("connection reset")


class FakeReceiver:
    """One receiver: asked for ``classes`` (every class when None). ``answers`` maps a
    UID to the outcome it gets (completed otherwise); after ``lost_after`` instances
    it is gone. ``cancel`` is set once ``cancel_after`` instances are in."""

    def __init__(
        self, classes: set[str] | None = None, answers: dict[str, Delivery] | None = None,
        lost_after: int | None = None, cancel: asyncio.Event | None = None, cancel_after: int = 0,
    ) -> None:
        self.classes = classes
        self.answers = answers or {}
        self.lost_after = lost_after
        self.cancel, self.cancel_after = cancel, cancel_after
        self.stored: list[str] = []

    preferred: tuple[str, ...] = ()

    def syntaxes(self, sop_class_uid: str) -> list[str]:
        return ["1.2.840.10008.1.2.1"] if self.offered(sop_class_uid) else []

    def offered(self, sop_class_uid: str) -> bool:
        return self.classes is None or sop_class_uid in self.classes

    def refusal(self, sop_class_uid: str) -> str:
        return "not taken here"

    async def send(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset: DataSource) -> Delivery:
        assert not isinstance(dataset, FileSlice) and bytes(dataset) == _dataset(sop_instance_uid)
        assert self.offered(sop_class_uid) and transfer_syntax == "1.2.840.10008.1.2.1"
        if self.lost_after is not None and len(self.stored) >= self.lost_after:
            raise TargetLost("receiver went away")
        self.stored.append(sop_instance_uid)
        if self.cancel is not None and len(self.stored) >= self.cancel_after:
            self.cancel.set()
        return self.answers.get(sop_instance_uid, Delivery(Outcome.COMPLETED))


def _retrieve(
    tmp_path: Path, archive: FakeArchive, per_class: bool = False, level: str = "SERIES",
    receiver: FakeReceiver | None = None, cancelled: asyncio.Event | None = None, reports: list[int] | None = None,
) -> tuple[Counts, list[FakeReceiver], Listing]:
    """Run a retrieval as the DIMSE front does (bulk answers and the listing that
    checks them); with ``per_class`` each opened receiver is asked only for the SOP
    classes of the instances it is opened with and of those listed by then, as a
    C-MOVE destination would be. ``receiver`` is the first one opened, if given. Every
    progress report is checked against the number due."""
    config = Config(spool=replace(SpoolConfig(), directory=tmp_path), retrieve=RetrieveConfig(fetch_concurrency=2))
    receivers: list[FakeReceiver] = []
    reports = [] if reports is None else reports

    async def go() -> tuple[Counts, Listing]:
        retriever = Retriever(config, archive)  # type: ignore[arg-type]
        request = RetrieveRequest(level, study_uids=(STUDY,), series_uids=(SERIES,) if level == "SERIES" else ())
        feed = retriever.bulk(request, "test")
        assert feed is not None
        listing = retriever.listing(request, feed)

        async def open_target(first: list[Fetched], refs: list[InstanceRef]) -> FakeReceiver:
            classes = {r.sop_class_uid for r in refs if r.sop_class_uid} | {f.sop_class_uid for f in first if f.sop_class_uid}
            if receiver is not None and not receivers:
                receivers.append(receiver)
            else:
                receivers.append(FakeReceiver(classes if per_class else None))
            return receivers[-1]

        async def report(counts: Counts) -> None:
            assert counts.total == listing.total() and counts.total >= len(listing.refs)
            reports.append(counts.total)

        try:
            return await retriever.run(listing, open_target, report, cancelled or asyncio.Event(), "test", feed), listing
        finally:
            await listing.close()
            await feed.close()
            retriever.close()

    counts, listing = asyncio.run(go())
    return counts, receivers, listing


def test_a_whole_bulk_answer_needs_no_instance_search(tmp_path: Path) -> None:
    """The archive counts 200 and the series answer brings 200: every instance goes in
    the order it came, none alone, no instance search at all, and progress reports
    start with the total from the count, before the answer has ended."""
    uids = [f"9.{i}" for i in range(1, 201)]
    archive = FakeArchive(uids, uids, bulk_fails=False, count=200)
    reports: list[int] = []
    counts, [receiver], listing = _retrieve(tmp_path, archive, reports=reports)
    assert (counts.total, counts.completed, counts.failed, counts.bulk) == (200, 200, 0, 200)
    assert receiver.stored == uids and archive.alone == [] and archive.searches == []
    assert reports and set(reports) == {200} and listing.expected == 200
    assert archive.unreleased() == 0


def test_a_study_answer_is_counted_at_the_study_level(tmp_path: Path) -> None:
    uids = [f"9.{i}" for i in range(1, 31)]
    archive = FakeArchive(uids, uids, bulk_fails=False, count=30)
    counts, [receiver], _ = _retrieve(tmp_path, archive, level="STUDY")
    assert (counts.total, counts.completed, counts.bulk) == (30, 30, 30)
    assert receiver.stored == uids and archive.searches == [] and archive.alone == []


def test_bulk_answer_cut_short_is_completed_one_by_one(tmp_path: Path) -> None:
    """The archive counts 20; its bulk answer brings one it stored since (the search
    does not list it), part of the list and a repeat, then fails: all it brought goes
    once, the search finds the rest, fetched alone, and the one the archive no longer
    has fails."""
    uids = [f"9.{i}" for i in range(1, 21)]
    archive = FakeArchive(uids[:-1], ["9.99", *uids[:5], uids[2]], bulk_fails=True, listed=uids, count=20)
    counts, [receiver], _ = _retrieve(tmp_path, archive)
    assert receiver.stored[:6] == ["9.99", *uids[:5]] and sorted(receiver.stored[6:]) == sorted(uids[5:-1])
    assert archive.alone == uids[5:] and len(archive.searches) == 1
    assert (counts.total, counts.completed, counts.failed, counts.failed_uids, counts.bulk) == (21, 20, 1, [uids[-1]], 6)
    assert archive.unreleased() == 0


def test_an_archive_that_does_not_count_is_searched_after_its_bulk_answer(tmp_path: Path) -> None:
    """No count: the series answer goes as it comes, then the search runs and finds
    nothing more to fetch; nothing is sent twice."""
    uids = [f"9.{i}" for i in range(1, 51)]
    archive = FakeArchive(uids, uids, bulk_fails=False)
    counts, [receiver], _ = _retrieve(tmp_path, archive)
    assert receiver.stored == uids and len(archive.searches) == 1 and archive.alone == []
    assert (counts.total, counts.completed, counts.bulk) == (50, 50, 50)


def test_sop_class_seen_after_the_association_opened_goes_over_a_second_one(tmp_path: Path) -> None:
    """CT first, then SR instances the bulk answer brings after the first receiver was
    opened for the CT it had by then: the CT go over it, the SR (fetched again) over a
    second one asked for the SR class, and every instance is sent once."""
    ct = [f"9.{i}" for i in range(1, 101)]
    sr = ["9.500", "9.501"]
    uids = ct + sr
    archive = FakeArchive(uids, uids, bulk_fails=False, classes=dict.fromkeys(sr, SR), count=102)
    counts, receivers, _ = _retrieve(tmp_path, archive, per_class=True)
    assert [r.classes for r in receivers] == [{CT}, {SR}]
    assert receivers[0].stored == ct and receivers[1].stored == sr
    assert (counts.total, counts.completed, counts.failed, final_status(counts)) == (102, 102, 0, 0x0000)
    assert archive.alone == sr and archive.searches == []
    assert archive.unreleased() == 0


def test_set_aside_instances_of_a_study_answer_are_found_by_one_search(tmp_path: Path) -> None:
    """A study's bulk answer does not say an instance's series, which fetching it alone
    needs: one search for the set-aside SR finds it, and they go over the second
    receiver."""
    ct = [f"9.{i}" for i in range(1, 101)]
    sr = ["9.500", "9.501"]
    uids = ct + sr
    archive = FakeArchive(uids, uids, bulk_fails=False, classes=dict.fromkeys(sr, SR), count=102)
    counts, receivers, _ = _retrieve(tmp_path, archive, per_class=True, level="STUDY")
    assert [r.stored for r in receivers] == [ct, sr] and archive.alone == sr
    [search] = archive.searches
    assert search.study_uid == STUDY  # type: ignore[attr-defined]
    assert (counts.total, counts.completed, final_status(counts)) == (102, 102, 0x0000)
    assert archive.unreleased() == 0


def test_one_sop_class_one_receiver(tmp_path: Path) -> None:
    uids = [f"9.{i}" for i in range(1, 151)]
    counts, receivers, _ = _retrieve(tmp_path, FakeArchive(uids, uids, bulk_fails=False, count=150), per_class=True)
    assert len(receivers) == 1 and counts.completed == 150


def test_search_failing_after_a_short_bulk_answer_accounts_for_what_is_known(tmp_path: Path) -> None:
    """The archive counts 100 and its answer breaks after 60: the search that should
    find the rest lists 30 (all sent already) and breaks too. The 60 are sent, the
    engine ends without waiting for more, the 40 never named count failed (without
    UIDs), and the listing keeps the error for the final status."""
    uids = [f"9.{i}" for i in range(1, 101)]
    archive = FakeArchive(uids, uids[:60], bulk_fails=True, listed=uids[:30], search_fails=True, count=100)
    counts, [receiver], listing = _retrieve(tmp_path, archive)
    assert isinstance(listing.error, UpstreamUnavailable) and listing.unknown() == 40
    assert (counts.total, counts.completed, counts.failed, counts.failed_uids) == (100, 60, 40, [])
    assert receiver.stored == uids[:60] and archive.alone == []
    assert archive.unreleased() == 0


def test_search_failing_before_anything_is_sent_raises(tmp_path: Path) -> None:
    archive = FakeArchive([], [], bulk_fails=False, listed=[], search_fails=True, count=1)
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


def test_receiver_answers_become_counts(tmp_path: Path) -> None:
    """A warning counts as a warning, a failure as failed with its UID, the rest completed."""
    uids = [f"9.{i}" for i in range(1, 11)]
    answers = {"9.3": Delivery(Outcome.WARNING), "9.7": Delivery(Outcome.FAILED, "refused")}
    counts, [receiver], _ = _retrieve(tmp_path, FakeArchive(uids, uids, False, count=10), receiver=FakeReceiver(answers=answers))
    assert receiver.stored == uids
    assert (counts.total, counts.completed, counts.warning, counts.failed, counts.failed_uids) == (10, 8, 1, 1, ["9.7"])


def test_receiver_gone_fails_that_instance_and_every_later_one(tmp_path: Path) -> None:
    """TargetLost on the fourth instance: three completed, the other seven failed in
    order, none sent after, and every fetched instance released."""
    uids = [f"9.{i}" for i in range(1, 11)]
    archive = FakeArchive(uids, uids, False, count=10)
    counts, [receiver], _ = _retrieve(tmp_path, archive, receiver=FakeReceiver(lost_after=3))
    assert receiver.stored == uids[:3]
    assert (counts.completed, counts.failed, counts.failed_uids, counts.remaining) == (3, 7, uids[3:], 0)
    assert archive.unreleased() == 0


def test_cancel_stops_between_instances_and_releases_the_rest(tmp_path: Path) -> None:
    """Cancelled while the fifth instance is being sent: it completes, nothing more
    goes, the rest stay remaining, and every instance fetched ahead is released."""
    uids = [f"9.{i}" for i in range(1, 21)]
    archive = FakeArchive(uids, uids, False, count=20)
    cancelled = asyncio.Event()
    counts, [receiver], _ = _retrieve(
        tmp_path, archive, receiver=FakeReceiver(cancel=cancelled, cancel_after=5), cancelled=cancelled
    )
    assert receiver.stored == uids[:5]
    assert (counts.total, counts.completed, counts.failed, counts.remaining) == (20, 5, 0, 15)
    assert archive.unreleased() == 0


def test_first_receiver_that_cannot_be_opened_raises_target_lost(tmp_path: Path) -> None:
    """The front decides what that means (C-MOVE fails every listed instance)."""
    uids = [f"9.{i}" for i in range(1, 6)]
    archive = FakeArchive(uids, uids, False)
    config = Config(spool=replace(SpoolConfig(), directory=tmp_path))

    async def go() -> None:
        retriever = Retriever(config, archive)  # type: ignore[arg-type]
        request = RetrieveRequest("SERIES", study_uids=(STUDY,), series_uids=(SERIES,))
        listing = retriever.listing(request)

        async def unreachable(first: list[Fetched], refs: list[InstanceRef]) -> FakeReceiver:
            raise TargetLost("cannot connect")

        async def report(counts: Counts) -> None:
            return None

        try:
            await retriever.run(listing, unreachable, report, asyncio.Event(), "test")
        finally:
            await listing.close()
            retriever.close()

    with pytest.raises(TargetLost):
        asyncio.run(go())
    assert archive.handed and archive.unreleased() == 0
