"""Unit tests of `with_study` and `as_studies`: a SERIES request without its study
gets it from one series search, only when that search finds every series in one
study; a PATIENT request becomes the STUDY request for the patient's studies. And of
a counted `Listing`: one count search at a time, and a count that breaks."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.model.search import Search
from gateway.retrieval.listing import Listing, as_studies, with_study
from gateway.retrieval.request import RetrieveRequest
from gateway.upstream.errors import UpstreamUnavailable


class SeriesArchive:
    """Answers a series search with ``found`` (series UID -> study UID), or fails."""

    def __init__(self, found: dict[str, str], fails: bool = False) -> None:
        self.found, self.fails = found, fails
        self.searches: list[Search] = []

    async def search_for_series(self, search: Search) -> AsyncIterator[dict[str, object]]:
        self.searches.append(search)
        if self.fails:
            raise UpstreamUnavailable("connection refused")
        for series, study in self.found.items():
            yield {"0020000E": {"vr": "UI", "Value": [series]}, "0020000D": {"vr": "UI", "Value": [study]}}


def _located(archive: SeriesArchive, request: RetrieveRequest) -> RetrieveRequest:
    return asyncio.run(with_study(archive, request))  # type: ignore[arg-type]


def test_series_of_one_study_get_that_study_from_one_search() -> None:
    archive = SeriesArchive({"1.2.3.1": "1.2.3", "1.2.3.2": "1.2.3"})
    request = RetrieveRequest("SERIES", series_uids=("1.2.3.1", "1.2.3.2"))
    assert _located(archive, request).study_uids == ("1.2.3",)
    [search] = archive.searches
    assert search.study_uid is None and search.include == (0x0020000D,)


def test_a_request_stays_as_it_was_unless_every_series_is_found_in_one_study() -> None:
    request = RetrieveRequest("SERIES", series_uids=("1.2.3.1", "1.2.3.2"))
    for archive in (
        SeriesArchive({"1.2.3.1": "1.2.3", "1.2.3.2": "1.2.4"}),  # two studies
        SeriesArchive({"1.2.3.1": "1.2.3"}),  # one series not found
        SeriesArchive({"1.2.3.1": "1.2.3", "1.2.3.2": "1.2.3", "9.9": "9"}, fails=True),  # the archive is down
        SeriesArchive({"1.2.3.1": "not a uid", "1.2.3.2": "not a uid"}),
    ):
        assert _located(archive, request) == request


def test_requests_naming_their_study_or_at_other_levels_need_no_search() -> None:
    archive = SeriesArchive({"1.2.3.1": "1.2.3"})
    for request in (
        RetrieveRequest("SERIES", study_uids=("1.2.3",), series_uids=("1.2.3.1",)),
        RetrieveRequest("STUDY", study_uids=("1.2.3",)),
        RetrieveRequest("IMAGE", series_uids=("1.2.3.1",), sop_uids=("1.2.3.1.1",)),
    ):
        assert _located(archive, request) == request
    assert archive.searches == []


class StudyArchive:
    """Answers a study search with ``studies`` (study UID -> patient ID), or fails."""

    def __init__(self, studies: dict[str, str], fails: bool = False) -> None:
        self.studies, self.fails = studies, fails

    async def search_for_studies(self, search: Search) -> AsyncIterator[dict[str, object]]:
        if self.fails:
            raise UpstreamUnavailable("connection refused")
        for study, patient in self.studies.items():
            yield {"0020000D": {"vr": "UI", "Value": [study]}, "00100020": {"vr": "LO", "Value": [patient]}}


def test_a_patient_request_becomes_one_for_the_patients_studies() -> None:
    """Only the studies of exactly that patient (the archive may match loosely); the
    request as it was when there is none, or the search fails."""
    request = RetrieveRequest("PATIENT", patient_id="P1")
    archive = StudyArchive({"1.2.3": "P1", "1.2.4": "P10", "1.2.5": "P1"})
    assert asyncio.run(as_studies(archive, request)) == RetrieveRequest("STUDY", study_uids=("1.2.3", "1.2.5"))  # type: ignore[arg-type]
    for archive in (StudyArchive({"1.2.4": "P10"}), StudyArchive({"1.2.3": "P1"}, fails=True)):
        assert asyncio.run(as_studies(archive, request)) == request  # type: ignore[arg-type]


class CountingArchive:
    """Counts ``per_study`` instances in every study, one search at a time or not (it
    records the most searches in flight at once); with ``breaks``, a count search
    raises something no upstream error is. Its instance search lists nothing."""

    def __init__(self, per_study: int, breaks: bool = False) -> None:
        self.per_study, self.breaks = per_study, breaks
        self.in_flight = self.most_in_flight = 0
        self.instance_searches = 0

    async def search_for_studies(self, search: Search) -> AsyncIterator[dict[str, object]]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.01)
            if self.breaks:
                raise RuntimeError("a bug in the archive client")
            study = search.keys[0].values[0]
            yield {"0020000D": {"vr": "UI", "Value": [study]}, "00201208": {"vr": "IS", "Value": [self.per_study]}}
        finally:
            self.in_flight -= 1

    async def search_for_instances(self, search: Search) -> AsyncIterator[dict[str, object]]:
        self.instance_searches += 1
        for _ in ():
            yield {}


def _counted(archive: CountingArchive, studies: tuple[str, ...]) -> Listing:
    async def run() -> Listing:
        listing = Listing(archive, RetrieveRequest("STUDY", study_uids=studies), [(s, None) for s in studies])  # type: ignore[arg-type]
        listing.bulk_over()
        await asyncio.wait_for(listing.complete(), 5)
        await listing.close()
        return listing

    return asyncio.run(run())


def test_the_studies_of_a_request_are_counted_one_search_at_a_time() -> None:
    """Five studies: five count searches, never two at once on the archive; the bulk
    answers brought nothing, so the instance search (one per study) runs after them."""
    archive = CountingArchive(per_study=3)
    listing = _counted(archive, tuple(f"1.2.{n}" for n in range(5)))
    assert listing.expected == 15 and archive.most_in_flight == 1
    assert archive.instance_searches == 5 and listing.done


def test_a_count_that_breaks_leaves_the_search_to_decide() -> None:
    archive = CountingArchive(per_study=3, breaks=True)
    listing = _counted(archive, ("1.2.1", "1.2.2"))
    assert listing.expected is None and archive.instance_searches == 2 and listing.done and listing.error is None
