"""C-FIND behaviour beyond matching: paging, streaming, the match cap, C-CANCEL,
upstream failures, hierarchy and malformed identifiers, sequence matching, logs.

Known differences from Orthanc 1.10.1 (DICOMweb plugin 1.7), all on Orthanc's side
or deliberate, and what each test below pins down:

* Relational queries (a SERIES query without StudyInstanceUID, a Patient Root STUDY
  query without PatientID) and keys below the query level: Orthanc answers them;
  the gateway refuses with 0xA900 and OffendingElement, as PS3.4 C.4.1.2.1 asks of
  an SCP that did not negotiate relational queries.
* Orthanc answers in UTF-8 whatever the request's SpecificCharacterSet; the gateway
  answers in the requested set when the values fit it, else UTF-8.
* Orthanc ignores sub-keys of a sequence key and returns every item; the gateway
  (embedded archive) matches them and returns the matching items reduced to the
  requested sub-keys. Through Orthanc's QIDO no sequence comes back at all, so a
  non-empty sequence key matches nothing there (see test_sequence_matching).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from tests.support.daemon import Gateway
from tests.support.fakeqido import FakeQido
from tests.support.finddata import Archive
from tests.support.findrun import find
from tests.support.orthanc import Orthanc
from tests.support.ports import closed_port

STUDY_ROOT = StudyRootQueryRetrieveInformationModelFind
PATIENT_ROOT = PatientRootQueryRetrieveInformationModelFind


def identifier(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def pyfind(port: int, ae_title: str, query: Dataset, model: Any = STUDY_ROOT) -> tuple[list[tuple[float, Dataset]], Dataset]:
    """C-FIND with pynetdicom: ([(seconds since sent, identifier)], final status)."""
    ae = AE(ae_title="PYFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    answers: list[tuple[float, Dataset]] = []
    final = Dataset()
    try:
        started = time.monotonic()
        for status, ds in assoc.send_c_find(query, model):
            assert status is not None, "no response (association aborted or timed out)"
            if status.Status in (0xFF00, 0xFF01):
                answers.append((time.monotonic() - started, ds))
            else:
                final = status
    finally:
        assoc.release()
    return answers, final


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeQido]]:
    servers: list[FakeQido] = []

    def make(**kwargs: Any) -> FakeQido:
        server = FakeQido(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def find_section(**values: Any) -> str:
    return "\n[find]\n" + "".join(f"{k} = {v}\n" for k, v in values.items())


def test_small_pages_still_return_every_match(
    gateway: Callable[..., Gateway], find_orthanc: Orthanc, find_archive: Archive
) -> None:
    gw = gateway(upstream_url=find_orthanc.dicomweb_url, extra=find_section(page_size=7))
    result = find(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientName": ""})
    assert result.final == "Success"
    assert sorted(str(ds.StudyInstanceUID) for ds in result.answers) == sorted(s.study_uid for s in find_archive.studies)


def test_pages_through_limit_and_offset(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    upstream = fake(count=250)
    gw = gateway(upstream_url=upstream.url, extra=find_section(page_size=20))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert final.Status == 0x0000
    assert len(answers) == 250
    # pages of 20 (find.page_size), two asked at once past the one answered: every
    # offset once, the last at most one page past the end
    offsets = sorted(int(p.split("offset=")[1].split("&")[0]) for p in upstream.requests)
    assert offsets == list(range(0, 20 * len(offsets), 20)) and 260 <= 20 * len(offsets) <= 280, offsets
    assert {int(p.split("limit=")[1].split("&")[0]) for p in upstream.requests} == {20}


def test_answers_stream_before_the_last_page(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    """Six pages of 0.4 s each: the first answers go out after the first page, the last
    after the pages that follow it (two asked at a time: at least three rounds more)."""
    upstream = fake(count=60, page_delay=0.4)
    gw = gateway(upstream_url=upstream.url, extra=find_section(page_size=10))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert final.Status == 0x0000 and len(answers) == 60
    first, last = answers[0][0], answers[-1][0]
    assert first < 1.0, f"first answer after {first:.2f} s"
    assert last > first + 1.1, f"first answer after {first:.2f} s, last after {last:.2f} s: they did not stream"


def test_cancel_stops_upstream_paging(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    upstream = fake(count=100000, page_delay=0.3)
    gw = gateway(upstream_url=upstream.url, extra=find_section(page_size=10))
    result = find(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, extra_args=["--cancel", "5"])
    assert result.final.startswith("Cancel"), result.output[-400:]
    assert len(result.answers) < 100
    pages = len(upstream.requests)
    time.sleep(1.0)
    assert len(upstream.requests) == pages, "the gateway kept paging after C-CANCEL"
    assert pages <= 3
    assert "cancelled" in gw.log()


def test_match_cap_ends_with_out_of_resources(gateway: Callable[..., Gateway], find_orthanc: Orthanc) -> None:
    gw = gateway(upstream_url=find_orthanc.dicomweb_url, extra=find_section(max_matches=25, page_size=10))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert len(answers) == 25
    assert final.Status == 0xA700
    assert "more than 25 matches" in final.ErrorComment


def test_match_cap_equal_to_the_answer_is_success(gateway: Callable[..., Gateway], find_orthanc: Orthanc) -> None:
    gw = gateway(upstream_url=find_orthanc.dicomweb_url, extra=find_section(max_matches=320))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert len(answers) == 320 and final.Status == 0x0000


def test_archive_capping_the_search_is_not_success(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    """An archive that lets a search reach only its first 30 of 50 matches (and says so
    with PS3.18's Warning) ends the C-FIND as the match cap does, never in Success."""
    upstream = fake(count=50, reach=30)
    gw = gateway(upstream_url=upstream.url, extra=find_section(page_size=20))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert len(answers) == 30
    assert final.Status == 0xA700
    assert "more than 30 matches" in final.ErrorComment
    assert "cut at 30 matches by the archive" in gw.log()


def test_archive_page_cap_is_paged_through(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    """An archive that cuts every page to 15 results and announces the rest is paged to
    the end: every match, Success."""
    upstream = fake(count=50, page_cap=15)
    gw = gateway(upstream_url=upstream.url, extra=find_section(page_size=20))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert len(answers) == 50 and final.Status == 0x0000


def test_an_archive_refusing_large_pages_is_paged_within_its_cap(
    gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]
) -> None:
    """Azure's DICOM service takes limit 1 to 200 and answers 400 above; with the
    default find.page_size (1000) the gateway's pages grow 100, 200, 400: it learns the
    cap from the refused 400 and pages by what the first page proved, for the rest of
    this search and the next."""
    upstream = fake(count=450, max_limit=200)
    gw = gateway(upstream_url=upstream.url)
    for _ in range(2):
        answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
        assert len(answers) == 450 and final.Status == 0x0000
        assert len({ds.StudyInstanceUID for _, ds in answers}) == 450
    asked = [parse_qs(urlsplit(path).query) for path in upstream.requests]
    limits = [int(query["limit"][0]) for query in asked]
    second = [n for n, query in enumerate(asked) if query["offset"] == ["0"]][1]
    # the first search: 100, then 200 and 400 at once (and 800, if asked before the
    # refusal of 400 was read), then pages of 100; the next search pages of 100 only
    assert limits[0] == 100 and sorted(limits[1:3]) == [200, 400] and set(limits[3:second]) <= {100, 800}, limits
    assert set(limits[second:]) == {100}, limits
    assert gw.log().count("archive refused limit=") == 1
    assert "archive refused limit=400 after taking limit=100" in gw.log()


def test_results_repeated_by_newest_first_paging_are_answered_once(
    gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]
) -> None:
    """Azure pages newest first: 7 studies stored after the first page shift the
    second page onto 7 results of the first. The C-FIND answers each match once."""
    upstream = fake(count=150, max_limit=200, arrivals=7)
    gw = gateway(upstream_url=upstream.url, extra=find_section(page_size=200))
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    uids = [ds.StudyInstanceUID for _, ds in answers]
    assert final.Status == 0x0000 and len(uids) == len(set(uids)) == 150


@pytest.mark.parametrize(
    ("status", "code", "comment"),
    [
        (401, 0xC000, "archive refused credentials: HTTP 401"),
        (403, 0xC000, "archive refused credentials: HTTP 403"),
        (500, 0xA700, "archive error: HTTP 500"),
        (503, 0xA700, "archive error: HTTP 503"),
        (400, 0xC000, "archive rejected search: HTTP 400"),
    ],
)
def test_upstream_http_errors(
    gateway: Callable[..., Gateway], fake: Callable[..., FakeQido], status: int, code: int, comment: str
) -> None:
    upstream = fake(status=status)
    gw = gateway(upstream_url=upstream.url)
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID="", PatientName="DOE^JOHN"))
    assert not answers
    assert final.Status == code
    assert final.ErrorComment.startswith(comment)
    assert "scripted failure" not in final.ErrorComment  # archive bodies may carry PHI
    if status in (401, 403):
        assert f"refused our credentials: HTTP {status}" in gw.log()


def test_malformed_values_from_the_archive_are_answered_empty(
    gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]
) -> None:
    """Values an archive sends that cannot be of their VR (a date as a JSON number, "abc"
    as an IS, an object as a LO, a VR no standard defines, a number past a double) are
    answered empty (PS3.4: unknown), the matches and their other keys as sent. Each
    had failed the whole C-FIND as the gateway's "internal error" with an ERROR line."""
    upstream = fake(count=3, extra={
        "00100030": {"vr": "DA", "Value": [20240101]},
        "00201208": {"vr": "IS", "Value": ["abc"]},
        "00081030": {"vr": "LO", "Value": [{"x": 1}]},
        "00080050": {"vr": "XX", "Value": ["ACC1"]},
        "00201206": {"vr": "IS", "Value": [1e308 * 10]},
        "00080090": {"vr": "PN", "Value": "DOCTOR^A"},
    })
    gw = gateway(upstream_url=upstream.url)
    query = identifier(
        "STUDY", StudyInstanceUID="", PatientName="", PatientBirthDate="", NumberOfStudyRelatedInstances="",
        StudyDescription="", AccessionNumber="", NumberOfStudyRelatedSeries="", ReferringPhysicianName="",
    )
    answers, final = pyfind(gw.port, gw.ae_title, query)
    assert final.Status == 0x0000 and len(answers) == 3
    ds = answers[0][1]
    assert str(ds.PatientName) == "FAKE^PATIENT"
    assert ds.PatientBirthDate == "" and ds.StudyDescription == "" and ds.NumberOfStudyRelatedInstances in ("", None)
    assert ds.NumberOfStudyRelatedSeries in ("", None)
    assert ds.AccessionNumber == "ACC1"  # its VR from the dictionary
    assert str(ds.ReferringPhysicianName) == "DOCTOR^A"  # a lone value not in an array
    assert " ERROR " not in gw.log()


def test_upstream_down(gateway: Callable[..., Gateway]) -> None:
    gw = gateway(upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web")
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert not answers
    assert final.Status == 0xA700
    assert final.ErrorComment.startswith("archive unreachable")


def test_upstream_that_never_answers_times_out(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    upstream = fake(hang=True)
    gw = gateway(upstream_url=upstream.url, extra=find_section(timeout=1))
    started = time.monotonic()
    answers, final = pyfind(gw.port, gw.ae_title, identifier("STUDY", StudyInstanceUID=""))
    assert final.Status == 0xA700 and "timeout" in final.ErrorComment
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("model", "query", "offending"),
    [
        (STUDY_ROOT, identifier("SERIES", SeriesInstanceUID="", Modality="CT"), 0x0020000D),
        (STUDY_ROOT, identifier("IMAGE", StudyInstanceUID="1.2.3", SOPInstanceUID=""), 0x0020000E),
        (STUDY_ROOT, identifier("STUDY", StudyInstanceUID="", Modality="CT"), 0x00080060),
        (STUDY_ROOT, identifier("PATIENT", PatientID=""), 0x00080052),
        (PATIENT_ROOT, identifier("STUDY", StudyInstanceUID=""), 0x00100020),
        (PATIENT_ROOT, identifier("STUDY", PatientID="PID*", StudyInstanceUID=""), 0x00100020),
        (STUDY_ROOT, identifier("SERIES", StudyInstanceUID="1.2.3\\1.2.4", SeriesInstanceUID=""), 0x0020000D),
        (STUDY_ROOT, identifier("FOO", StudyInstanceUID=""), 0x00080052),
    ],
    ids=["series-no-study", "image-no-series", "study-with-series-key", "patient-in-study-root",
         "patient-root-no-patient", "patient-id-wildcard", "study-uid-list-above", "bad-level"],
)
def test_hierarchy_violations_are_refused(find_local: Gateway, model: Any, query: Dataset, offending: int) -> None:
    answers, final = pyfind(find_local.port, find_local.ae_title, query, model)
    assert not answers
    assert final.Status == 0xA900
    elements = final.OffendingElement
    assert offending in ([int(elements)] if isinstance(elements, int) else [int(t) for t in elements])


@pytest.mark.parametrize(
    "keys",
    [{"StudyDate": "2020X"}, {"StudyDate": "20201301"}, {"StudyDate": "-"}, {"StudyTime": "25"}, {"StudyInstanceUID": "1.2.abc"}],
    ids=["bad-date", "bad-month", "bare-dash", "bad-time", "bad-uid"],
)
def test_malformed_values_are_unable_to_process(find_local: Gateway, keys: dict[str, str]) -> None:
    query = identifier("STUDY", **{"StudyInstanceUID": "", **keys})
    answers, final = pyfind(find_local.port, find_local.ae_title, query)
    assert not answers
    assert final.Status == 0xC000


def test_a_find_asking_140_return_keys_is_answered(find_local: Gateway, find_archive: Archive) -> None:
    """The embedded archive picks the attributes asked out of its stored headers with
    SQLite; one call takes at most 127 arguments, so an IMAGE-level C-FIND asking 140
    return keys failed with "too many arguments on function json_extract" (0xC000).
    Past 100 the whole header is read instead."""
    study = find_archive.studies[0]
    series = study.series[0]
    instance = series.instances[0]
    query = identifier(
        "IMAGE", StudyInstanceUID=study.study_uid, SeriesInstanceUID=series.series_uid, SOPInstanceUID=instance.sop_instance_uid
    )
    extra = [tag for tag, entry in sorted(DicomDictionary.items()) if tag >> 16 == 0x0018 and entry[0] in ("LO", "SH", "CS", "DS", "IS")]
    for tag in extra[:140]:
        query.add_new(tag, DicomDictionary[tag][0], "")
    answers, final = pyfind(find_local.port, find_local.ae_title, query)
    assert final.Status == 0x0000, final
    assert [str(ds.SOPInstanceUID) for _, ds in answers] == [instance.sop_instance_uid]
    assert all(tag in answers[0][1] for tag in extra[:140])  # every key asked is answered, empty or not


def test_sequence_matching(find_local: Gateway, find_gateway: Gateway, find_archive: Archive) -> None:
    item = Dataset()
    item.CodeValue = "P1-100"
    item.CodeMeaning = ""
    query = identifier("STUDY", StudyInstanceUID="", ProcedureCodeSequence=Sequence([item]))
    answers, final = pyfind(find_local.port, find_local.ae_title, query)
    assert final.Status == 0x0000
    expected = {s.study_uid for s in find_archive.studies if s.procedure_code[0] == "P1-100"}
    assert {str(ds.StudyInstanceUID) for _, ds in answers} == expected
    for _, ds in answers:
        (returned,) = ds.ProcedureCodeSequence
        assert set(returned.keys()) == {0x00080100, 0x00080104}  # only the requested sub-keys
        assert returned.CodeMeaning == "CHEST"
    # Orthanc's QIDO returns no sequences, so the gateway cannot confirm a match there.
    over_orthanc, final = pyfind(find_gateway.port, find_gateway.ae_title, query)
    assert final.Status == 0x0000 and not over_orthanc


def test_logs_carry_no_patient_data(find_gateway: Gateway) -> None:
    find(find_gateway.port, find_gateway.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "", "PatientName": "O'NEIL*", "PatientID": "PID0007"})
    log = find_gateway.log()
    assert "C-FIND from" in log
    assert "O'NEIL" not in log and "PID0007" not in log


def test_association_survives_a_failed_find(gateway: Callable[..., Gateway], fake: Callable[..., FakeQido]) -> None:
    """A failed C-FIND ends that request only; the next one on the same association works."""
    upstream = fake(count=3)
    gw = gateway(upstream_url=upstream.url)
    ae = AE(ae_title="PYFIND")
    ae.add_requested_context(STUDY_ROOT)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
    try:
        statuses = [s.Status for s, _ in assoc.send_c_find(identifier("STUDY", StudyDate="bad"), STUDY_ROOT)]
        assert statuses == [0xC000]
        statuses = [s.Status for s, _ in assoc.send_c_find(identifier("STUDY", StudyInstanceUID=""), STUDY_ROOT)]
        assert statuses == [0xFF00] * 3 + [0x0000]
    finally:
        assoc.release()


def test_a_uid_list_longer_than_a_url_is_searched_in_parts(find_gateway: Gateway, find_archive: Archive, find_orthanc: Orthanc) -> None:
    """PS3.4 C.2.2.2.2 list of UID matching: 600 Study Instance UIDs (three of them
    real) make a 40 KB QIDO-RS URL, which Orthanc refused (HTTP 400, so 0xC000); in
    parts of about 60 each, the three studies are found."""
    real = [s.study_uid for s in find_archive.studies[:3]]
    listed = [f"1.2.826.0.1.3680043.10.1137.404.{n}" for n in range(597)] + real
    result = find(find_gateway.port, find_gateway.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "\\".join(listed)})
    assert result.final == "Success", result.output[-500:]
    assert sorted(str(a.StudyInstanceUID) for a in result.answers) == sorted(real)
    assert "HTTP 400" not in find_gateway.log()
