"""Unit tests of `with_study` and `as_studies`: a SERIES request without its study
gets it from one series search, only when that search finds every series in one
study; a PATIENT request becomes the STUDY request for the patient's studies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from gateway.model.search import Search
from gateway.retrieval.listing import as_studies, with_study
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
