"""Unit tests of QIDO-RS parameters built from C-FIND keys."""

from __future__ import annotations

from urllib.parse import unquote

from pydicom.dataset import Dataset

from gateway.model.json import answer_charset, dataset_from_json
from gateway.model.search import Search
from gateway.dicomweb.qido import UID_LIST_CHARS, QidoOptions, query_string, resource_path, split_long_lists
from gateway.model.query import Key, Model, parse_identifier


def options(relax: bool = True) -> QidoOptions:
    return QidoOptions(relax_unsafe=relax, local_only=frozenset({0x00080061}))


def search(**keys: str) -> Search:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    q = parse_identifier(ds, Model.STUDY_ROOT)
    return Search(keys=q.match_keys, include=tuple(k.tag for k in q.keys))


def test_match_parameters_and_includefield() -> None:
    qs = query_string(search(StudyDate="20200101-", StudyInstanceUID="1.2.3\\1.2.4", PatientID=""), options(), 100, 200)
    assert "00080020=20200101-" in qs
    assert "0020000D=1.2.3,1.2.4" in qs
    assert "includefield=00100020" in qs
    assert qs.endswith("limit=100&offset=200")


def test_unsafe_characters_become_wildcards_when_relaxed() -> None:
    assert "00100010=VAN*DER*BERG*PIETER" in query_string(search(PatientName="VAN DER BERG^PIETER"), options(), 10, 0)
    assert "00100010=M*LLER*" in query_string(search(PatientName="MÜLLER*"), options(), 10, 0)
    # nothing left but wildcards: not sent at all, the gateway filters
    assert "00100010=" not in query_string(search(PatientName="山田*"), options(), 10, 0)


def test_percent_encoding_when_not_relaxed() -> None:
    qs = query_string(search(PatientName="VAN DAM^ELS"), options(False), 10, 0)
    assert "00100010=VAN%20DAM%5EELS" in qs
    assert unquote("VAN%20DAM%5EELS") == "VAN DAM^ELS"


def test_local_only_keys_are_not_sent() -> None:
    assert "00080061=" not in query_string(search(ModalitiesInStudy="CT"), options(), 10, 0)


def test_resource_paths() -> None:
    assert resource_path("series", "1.2", None) == "studies/1.2/series"
    assert resource_path("series", None, None) == "series"
    assert resource_path("instances", "1.2", "1.3") == "studies/1.2/series/1.3/instances"


def test_dicom_json_person_name_groups_and_charset() -> None:
    obj = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"}]},
           "00201208": {"vr": "IS", "Value": [5]}, "00080061": {"vr": "CS", "Value": ["CT", "MR"]}}
    ds = dataset_from_json(obj)
    assert str(ds.PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert ds.NumberOfStudyRelatedInstances == 5
    assert list(ds.ModalitiesInStudy) == ["CT", "MR"]
    assert answer_charset(ds, ["", "ISO 2022 IR 87"]) == ["", "ISO 2022 IR 87"]
    assert answer_charset(ds, ["ISO_IR 100"]) == ["ISO_IR 192"]


def test_a_uid_list_too_long_for_one_url_is_split_and_other_long_keys_left_out() -> None:
    uids = tuple(f"1.2.826.0.1.3680043.10.1137.404.{n}" for n in range(600))
    names = tuple(f"NAME{n:05d}" for n in range(600))
    search = Search(keys=(
        Key(0x0020000D, "UI", uids), Key(0x00100020, "LO", names), Key(0x00080060, "CS", ("CT", "MR")),
    ))
    parts = split_long_lists(search)
    assert len(parts) > 1
    assert [v for part in parts for v in part.keys[0].values] == list(uids)  # split, in order, nothing lost
    for part in parts:
        assert sum(len(v) + 1 for v in part.keys[0].values) <= UID_LIST_CHARS
        assert [k.tag for k in part.keys] == [0x0020000D, 0x00080060]  # the long ID list is left to the gateway
        assert len(query_string(part, QidoOptions(), 100, 0)) < 5000
    short = Search(keys=(Key(0x0020000D, "UI", uids[:3]),))
    assert split_long_lists(short) == [short]
