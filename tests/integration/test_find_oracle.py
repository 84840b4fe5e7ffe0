"""C-FIND conformance: the gateway answers what Orthanc answers for the same archive.

The same battery of findscu queries runs against Orthanc's own DIMSE port (the
oracle), against a gateway whose upstream is that Orthanc's DICOMweb, and against a
gateway on its embedded archive holding the same files. Matched entities and the
values of every returned key must be equal, except for the differences listed in
the module docstring of ``tests/integration/test_find_behaviour.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.support.daemon import Gateway
from tests.support.finddata import Archive
from tests.support.findrun import FindResult, answer_set, find
from tests.support.orthanc import Orthanc

U = "1.2.826.0.1.3680043.10.1137."
STUDY_KEYS = {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": ""}
JAPANESE = ["", "ISO 2022 IR 87"]


@dataclass
class Case:
    id: str
    model: str
    keys: dict[str, str]
    unique: str
    charset: list[str] | None = None
    min_matches: int = 1
    extra: dict[str, str] = field(default_factory=dict)


CASES = [
    # Study Root, STUDY level: every matching type
    Case("pn-wildcard", "study", {**STUDY_KEYS, "PatientName": "DOE*"}, "StudyInstanceUID"),
    Case("pn-case-insensitive", "study", {**STUDY_KEYS, "PatientName": "doe^john"}, "StudyInstanceUID"),
    Case("pn-inner-wildcard", "study", {**STUDY_KEYS, "PatientName": "*JOHN*"}, "StudyInstanceUID"),
    Case("pn-question-mark", "study", {**STUDY_KEYS, "PatientName": "SMITH^ANN?"}, "StudyInstanceUID"),
    Case("pn-spaces", "study", {**STUDY_KEYS, "PatientName": "VAN DER BERG^PIETER"}, "StudyInstanceUID"),
    Case("pn-apostrophe", "study", {**STUDY_KEYS, "PatientName": "O'NEIL*"}, "StudyInstanceUID"),
    Case("pn-latin1", "study", {**STUDY_KEYS, "PatientName": "MÜLLER*"}, "StudyInstanceUID", ["ISO_IR 100"]),
    Case("pn-latin1-lower", "study", {**STUDY_KEYS, "PatientName": "müller^jürgen"}, "StudyInstanceUID", ["ISO_IR 100"]),
    Case("pn-utf8", "study", {**STUDY_KEYS, "PatientName": "DVOŘÁK*"}, "StudyInstanceUID", ["ISO_IR 192"]),
    Case("pn-utf8-greek", "study", {**STUDY_KEYS, "PatientName": "*ΝΙΚΟΣ"}, "StudyInstanceUID", ["ISO_IR 192"]),
    Case("pn-japanese-ideographic", "study", {**STUDY_KEYS, "PatientName": "*山田*"}, "StudyInstanceUID", JAPANESE),
    Case("pn-japanese-alphabetic", "study", {**STUDY_KEYS, "PatientName": "Yamada*"}, "StudyInstanceUID", JAPANESE),
    Case("names-latin1-answer", "study", {**STUDY_KEYS, "PatientID": "PID003?"}, "StudyInstanceUID", ["ISO_IR 100"]),
    Case("names-utf8-answer", "study", {**STUDY_KEYS, "PatientID": "PID004*"}, "StudyInstanceUID", ["ISO_IR 192"]),
    Case("names-japanese-answer", "study", {**STUDY_KEYS, "PatientID": "PID005?"}, "StudyInstanceUID", JAPANESE),
    Case("date-range", "study", {**STUDY_KEYS, "StudyDate": "20200101-20201231"}, "StudyInstanceUID"),
    Case("date-open-end", "study", {**STUDY_KEYS, "StudyDate": "20240601-"}, "StudyInstanceUID"),
    Case("date-open-start", "study", {**STUDY_KEYS, "StudyDate": "-20150301"}, "StudyInstanceUID"),
    Case("date-single", "study", {**STUDY_KEYS, "StudyDate": "20190715"}, "StudyInstanceUID"),
    Case(
        "date-and-time",
        "study",
        {**STUDY_KEYS, "StudyDate": "20200101-20211231", "StudyTime": "120000-180000"},
        "StudyInstanceUID",
    ),
    Case("uid-list", "study", {**STUDY_KEYS, "StudyInstanceUID": f"{U}1.1\\{U}1.2\\{U}1.250"}, "StudyInstanceUID", min_matches=3),
    Case("modalities-one", "study", {**STUDY_KEYS, "ModalitiesInStudy": "PT"}, "StudyInstanceUID"),
    Case("modalities-list", "study", {**STUDY_KEYS, "ModalitiesInStudy": "US\\OT"}, "StudyInstanceUID"),
    Case("accession-wildcard", "study", {**STUDY_KEYS, "AccessionNumber": "ACC00001?"}, "StudyInstanceUID"),
    Case("accession-case", "study", {**STUDY_KEYS, "AccessionNumber": "acc000001"}, "StudyInstanceUID", min_matches=0),
    Case("description-wildcard", "study", {**STUDY_KEYS, "StudyDescription": "KNEE*"}, "StudyInstanceUID"),
    Case("description-spaces", "study", {**STUDY_KEYS, "StudyDescription": "BRAIN W/O CONTRAST"}, "StudyInstanceUID"),
    Case("referring-physician", "study", {**STUDY_KEYS, "ReferringPhysicianName": "HOUSE^GREGORY"}, "StudyInstanceUID"),
    Case("sex-and-birth", "study", {**STUDY_KEYS, "PatientSex": "F", "PatientBirthDate": "19500101-19701231"}, "StudyInstanceUID"),
    Case(
        "return-keys",
        "study",
        {
            **STUDY_KEYS, "PatientID": "PID0001", "StudyTime": "", "AccessionNumber": "", "StudyID": "",
            "StudyDescription": "", "ReferringPhysicianName": "", "ModalitiesInStudy": "", "PatientBirthDate": "",
            "PatientSex": "", "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
        },
        "StudyInstanceUID",
    ),
    Case("all-studies", "study", {"StudyInstanceUID": ""}, "StudyInstanceUID", min_matches=320),
    # Study Root, SERIES and IMAGE levels
    Case(
        "series",
        "study",
        {"StudyInstanceUID": f"{U}1.7", "SeriesInstanceUID": "", "Modality": "", "SeriesNumber": "",
         "SeriesDescription": "", "NumberOfSeriesRelatedInstances": ""},
        "SeriesInstanceUID",
    ),
    Case("series-modality", "study", {"StudyInstanceUID": f"{U}1.4", "SeriesInstanceUID": "", "Modality": "CT"}, "SeriesInstanceUID", min_matches=0),
    Case("series-description", "study", {"StudyInstanceUID": f"{U}1.4", "SeriesInstanceUID": "", "SeriesDescription": "* SERIES 1"}, "SeriesInstanceUID"),
    Case(
        "image",
        "study",
        {"StudyInstanceUID": f"{U}1.5", "SeriesInstanceUID": f"{U}2.5.1", "SOPInstanceUID": "",
         "InstanceNumber": "", "SOPClassUID": ""},
        "SOPInstanceUID",
    ),
    # Patient Root, all four levels
    Case("patients-all", "patient", {"PatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": ""}, "PatientID", min_matches=64),
    Case("patients-name", "patient", {"PatientID": "", "PatientName": "S*"}, "PatientID"),
    Case("patients-japanese", "patient", {"PatientID": "", "PatientName": "*田*"}, "PatientID", JAPANESE),
    Case(
        "patients-counts",
        "patient",
        {"PatientID": "PID000*", "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
         "NumberOfPatientRelatedInstances": ""},
        "PatientID",
    ),
    Case("patient-root-study", "patient", {"PatientID": "PID0002", "StudyInstanceUID": "", "StudyDate": "", "StudyDescription": ""}, "StudyInstanceUID"),
    Case(
        "patient-root-series",
        "patient",
        {"PatientID": "PID0000", "StudyInstanceUID": f"{U}1.1", "SeriesInstanceUID": "", "Modality": ""},
        "SeriesInstanceUID",
    ),
    Case(
        "patient-root-image",
        "patient",
        {"PatientID": "PID0000", "StudyInstanceUID": f"{U}1.1", "SeriesInstanceUID": f"{U}2.1.1", "SOPInstanceUID": "", "InstanceNumber": ""},
        "SOPInstanceUID",
    ),
]

LEVELS = {"StudyInstanceUID": "STUDY", "SeriesInstanceUID": "SERIES", "SOPInstanceUID": "IMAGE", "PatientID": "PATIENT"}

def _keys(case: Case) -> dict[str, str]:
    return {"QueryRetrieveLevel": LEVELS[case.unique], **case.keys}


def _run(port: int, ae: str, case: Case) -> FindResult:
    return find(port, ae, _keys(case), model=case.model, charset=case.charset)


@pytest.fixture(scope="module")
def oracle_answers(find_orthanc: Orthanc) -> dict[str, FindResult]:
    return {c.id: _run(find_orthanc.dicom_port, find_orthanc.aet, c) for c in CASES}


def _compare(case: Case, ours: FindResult, theirs: FindResult, our_ae: str) -> None:
    assert theirs.final == "Success", f"oracle failed {case.id}: {theirs.output[-500:]}"
    assert ours.final == "Success", f"{case.id}: {ours.output[-800:]}"
    expected, got = answer_set(theirs, case.unique), answer_set(ours, case.unique)
    assert len(expected) >= case.min_matches, f"{case.id}: oracle matched only {len(expected)}"
    assert sorted(got) == sorted(expected), f"{case.id}: matched entities differ"
    for uid, values in expected.items():
        assert got[uid] == values, f"{case.id}: answer for {uid} differs"
    for ds in ours.answers:
        assert ds.RetrieveAETitle == our_ae
        assert ds.QueryRetrieveLevel == LEVELS[case.unique]
        assert "SpecificCharacterSet" in ds


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_gateway_over_dicomweb_matches_orthanc(
    case: Case, find_gateway: Gateway, oracle_answers: dict[str, FindResult]
) -> None:
    _compare(case, _run(find_gateway.port, find_gateway.ae_title, case), oracle_answers[case.id], find_gateway.ae_title)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_embedded_archive_matches_orthanc(
    case: Case, find_local: Gateway, oracle_answers: dict[str, FindResult]
) -> None:
    _compare(case, _run(find_local.port, find_local.ae_title, case), oracle_answers[case.id], find_local.ae_title)


def test_answers_use_the_requested_character_set(find_gateway: Gateway, find_archive: Archive) -> None:
    """Latin-1 names come back in ISO_IR 100 when asked so, Japanese in ISO 2022 IR 87."""
    latin = find(find_gateway.port, find_gateway.ae_title, _keys(CASES[6]), charset=["ISO_IR 100"])
    assert latin.answers and all(ds.SpecificCharacterSet == "ISO_IR 100" for ds in latin.answers)
    assert {str(ds.PatientName) for ds in latin.answers} == {"MÜLLER^JÜRGEN", "MÜLLER^JÖRG"}
    japanese = find(find_gateway.port, find_gateway.ae_title, _keys(CASES[14]), charset=JAPANESE)
    assert japanese.answers
    for ds in japanese.answers:
        assert list(ds.SpecificCharacterSet) == JAPANESE
        patient = find_archive.patient_of(str(ds.StudyInstanceUID))
        assert str(ds.PatientName) == patient.name
        if patient.charset == "japanese":
            assert ds.PatientName.ideographic and ds.PatientName.phonetic
    # A name that ISO_IR 100 cannot hold is answered in UTF-8 rather than mangled.
    keys = {"QueryRetrieveLevel": "STUDY", **STUDY_KEYS, "PatientID": "PID0043"}
    utf8 = find(find_gateway.port, find_gateway.ae_title, keys, charset=["ISO_IR 100"])
    assert utf8.answers and all(ds.SpecificCharacterSet == "ISO_IR 192" for ds in utf8.answers)
    assert all(str(ds.PatientName) == "DVOŘÁK^ANTONÍN" for ds in utf8.answers)
