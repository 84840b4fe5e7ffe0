"""Unit tests of the C-FIND query model: hierarchy checks and PS3.4 C.2.2.2 matching."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.dimse.find import failure_status
from gateway.model.query import Model, QueryError, parse_identifier, wildcard_match


def query(level: str = "STUDY", model: Model = Model.STUDY_ROOT, **keys: Any) -> Any:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return parse_identifier(ds, model)


def entity(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("key", "value", "matches"),
    [
        ("DOE*", "DOE^JOHN", True),
        ("doe^john", "DOE^JOHN", True),  # PN: case-insensitive
        ("DOE^JOHN", "DOE^JOHN^^^", True),  # trailing empty components ignored
        ("SMITH^ANN?", "SMITH^ANNE", True),
        ("SMITH^ANN?", "SMITH^ANNA^MARIE", False),
        ("*山田*", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),  # any component group
        ("やまだ*", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),
        ("=山田^太郎", "Yamada^Tarou=山田^太郎=やまだ^たろう", True),  # group by group
        ("Yamada*=田中*", "Yamada^Tarou=山田^太郎=やまだ^たろう", False),
    ],
)
def test_person_name_matching(key: str, value: str, matches: bool) -> None:
    assert query(PatientName=key).matches(entity(PatientName=value)) is matches


def test_universal_pn_forms() -> None:
    for key in ("*", "^", "*^*", ""):
        assert not query(PatientName=key).match_keys


def test_text_is_case_sensitive_and_wildcards_work() -> None:
    q = query(AccessionNumber="ACC00001?")
    assert q.matches(entity(AccessionNumber="ACC000012"))
    assert not query(AccessionNumber="acc000012").matches(entity(AccessionNumber="ACC000012"))


@pytest.mark.parametrize(
    ("key", "value", "matches"),
    [
        ("20200101-20201231", "20200615", True),
        ("20200101-20201231", "20210101", False),
        ("20240601-", "20250101", True),
        ("-20150201", "20150201", True),
        ("20190715", "20190715", True),
        ("20190715", "20190716", False),
    ],
)
def test_date_ranges(key: str, value: str, matches: bool) -> None:
    assert query(StudyDate=key).matches(entity(StudyDate=value)) is matches


def test_time_range_partial_upper_bound_includes_the_hour() -> None:
    q = query(StudyTime="10-13")
    assert q.matches(entity(StudyTime="135959.5"))
    assert not q.matches(entity(StudyTime="140000"))
    assert not q.matches(entity(StudyTime="095959"))


def test_uid_list_and_multi_valued_attributes() -> None:
    assert query(StudyInstanceUID="1.2.3\\1.2.4").matches(entity(StudyInstanceUID="1.2.4"))
    q = query(ModalitiesInStudy="US\\OT")
    assert q.matches(entity(ModalitiesInStudy=["CT", "OT"]))
    assert not q.matches(entity(ModalitiesInStudy=["CT", "MR"]))


def test_absent_value_matches_only_universal_keys() -> None:
    assert not query(StudyDescription="KNEE*").matches(entity())
    assert query(StudyDescription="").matches(entity())


def test_sequence_matching_and_reduced_items() -> None:
    item = Dataset()
    item.CodeValue = "P1-100"
    item.CodeMeaning = ""
    q = query(ProcedureCodeSequence=Sequence([item]))
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "P1-100", "99GW", "CHEST"
    other = Dataset()
    other.CodeValue, other.CodingSchemeDesignator, other.CodeMeaning = "P1-200", "99GW", "HEAD"
    study = entity(ProcedureCodeSequence=Sequence([other, code]))
    assert q.matches(study)
    (returned,) = q.answer(study, "GW").ProcedureCodeSequence
    assert set(returned.keys()) == {0x00080100, 0x00080104}


def test_answer_holds_exactly_the_requested_keys() -> None:
    q = query(PatientName="", StudyInstanceUID="", RetrieveAETitle="")
    answer = q.answer(entity(PatientName="DOE^JOHN", StudyInstanceUID="1.2.3", StudyDate="20200101"), "GW")
    assert [e.keyword for e in answer] == [
        "SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle", "PatientName", "StudyInstanceUID"
    ]
    assert answer.RetrieveAETitle == "GW"


def test_answer_character_set() -> None:
    q = query(PatientName="", SpecificCharacterSet="ISO_IR 100")
    assert q.answer(entity(PatientName="MÜLLER^JÜRGEN"), "GW").SpecificCharacterSet == "ISO_IR 100"
    assert q.answer(entity(PatientName="DVOŘÁK^ANTONÍN"), "GW").SpecificCharacterSet == "ISO_IR 192"


@pytest.mark.parametrize(
    ("level", "model", "keys", "status"),
    [
        ("SERIES", Model.STUDY_ROOT, {"SeriesInstanceUID": ""}, 0xA900),
        ("STUDY", Model.PATIENT_ROOT, {"StudyInstanceUID": ""}, 0xA900),
        ("STUDY", Model.STUDY_ROOT, {"Modality": "CT"}, 0xA900),
        ("PATIENT", Model.STUDY_ROOT, {"PatientID": ""}, 0xA900),
        ("STUDY", Model.STUDY_ROOT, {"StudyDate": "2020-13"}, 0xC000),
        ("STUDY", Model.STUDY_ROOT, {"StudyInstanceUID": "1.2.x"}, 0xC000),
    ],
)
def test_refusals(level: str, model: Model, keys: dict[str, str], status: int) -> None:
    with pytest.raises(QueryError) as info:
        query(level, model, **keys)
    assert failure_status(info.value).status == status


def test_universal_key_below_the_level_is_answered_empty() -> None:
    q = query(StudyInstanceUID="", Modality="")
    assert q.answer(entity(StudyInstanceUID="1.2.3", Modality="CT"), "GW").Modality == ""


def test_wildcards_match_as_ps34_says() -> None:
    cases = [
        ("*", "", True), ("?", "", False), ("A*", "ABC", True), ("*C", "ABC", True), ("A?C", "ABC", True),
        ("A?C", "AC", False), ("*B*", "ABC", True), ("A*B*C", "AXBYC", True), ("A*B*C", "AXBY", False),
        ("**", "X", True), ("*?", "", False), ("a*", "ABC", False),
    ]
    for pattern, value, expected in cases:
        assert wildcard_match(pattern, value) is expected, (pattern, value)


@pytest.mark.timeout(10)
def test_a_pattern_of_many_stars_matches_in_bounded_time() -> None:
    """A regular expression made of ``*A`` twenty times then ``B`` backtracks
    exponentially against sixty A's: the daemon's event loop never came back."""
    assert not wildcard_match("*A" * 20 + "B", "A" * 64)
    assert wildcard_match("*A" * 20 + "*", "A" * 64)
