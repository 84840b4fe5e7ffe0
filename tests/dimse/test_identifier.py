"""The direct C-FIND answer encoder against the pydicom path it replaces.

For every result, key set, requested character set and transfer syntax below, the
two paths must agree on whether the result matches and on the answer's bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydicom.dataset import Dataset

from gateway.config import Config
from gateway.model.json import dataset_from_json
from gateway.dimse.find import FindService, encode_identifier
from gateway.dimse.identifier import AnswerWriter, Unsupported, attributes_from_json
from gateway.model.query import Model, Query, parse_identifier

IMPLICIT = "1.2.840.10008.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def pn(alphabetic: str, ideographic: str = "", phonetic: str = "") -> dict[str, Any]:
    groups = {"Alphabetic": alphabetic, "Ideographic": ideographic, "Phonetic": phonetic}
    return {"vr": "PN", "Value": [{k: v for k, v in groups.items() if v}]}


def study(**attrs: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {
        "0020000D": {"vr": "UI", "Value": ["1.2.3.45"]},  # odd length: NUL padding
        "00100020": {"vr": "LO", "Value": ["PID1"]},
        "00100010": pn("DOE^JOHN"),
        "00080020": {"vr": "DA", "Value": ["20200102"]},
        "00080030": {"vr": "TM", "Value": ["101010.5"]},
        "00080061": {"vr": "CS", "Value": ["CT", "MR", "PT"]},
        "00201206": {"vr": "IS", "Value": [3]},
        "00201208": {"vr": "IS", "Value": [17.0]},
        "00081030": {"vr": "LO", "Value": ["KNEE LEFT"]},
        "00080050": {"vr": "SH"},
        "00080090": {"vr": "PN", "Value": [None]},
        "00101020": {"vr": "DS", "Value": [1.75]},
        "00101030": {"vr": "DS", "Value": ["72.50"]},
    }
    base.update({k: v for k, v in attrs.items()})
    return base


RESULTS = [
    study(),
    study(**{"00100010": pn("MÜLLER^JÜRGEN")}),
    study(**{"00100010": pn("DVOŘÁK^ANTONÍN")}),
    study(**{"00100010": pn("Yamada^Tarou", "山田^太郎", "やまだ^たろう")}),
    study(**{"00100010": pn("Wang^XiaoDong", "王^小東")}),
    study(**{"00100010": {"vr": "PN", "Value": ["PLAIN^STRING"]}}),
    study(**{"00081030": {"vr": "LO", "Value": ["A\\B"]}}),  # split like pydicom
    study(**{"00081030": {"vr": "LO", "Value": ["TWO", "VALUES"]}}),
    study(**{"00081030": {"vr": "LO", "Value": ["TRAILING  "]}}),
    study(**{"00080061": {"vr": "CS", "Value": []}}),
    study(**{"00201206": {"vr": "IS", "Value": ["4"]}}),
    study(**{"00101020": {"vr": "DS", "Value": [2, 1e-7]}}),
    study(**{"00100020": {"vr": "LO", "Value": ["ÅSTRÖM"]}}),
    {"0020000D": {"vr": "UI", "Value": ["1.2.3.4"]}},
    # Plain ASCII results, as most archives hold them: answered by encode_json.
    study(**{"00101020": {"vr": "DS"}, "00101030": {"vr": "DS", "Value": []}, "00201208": {"vr": "IS", "Value": [17]}}),
    study(**{"00101020": {"vr": "DS"}, "00101030": {"vr": "DS"}, "00100010": pn("DOE^JOHN^^", "", "")}),
    study(**{"00101020": {"vr": "DS"}, "00101030": {"vr": "DS"}, "00100010": {"vr": "PN", "Value": ["DOE^JOHN="]}}),
    study(**{"00101020": {"vr": "DS"}, "00101030": {"vr": "DS"}, "00081030": {"vr": "LO", "Value": ["A\\B", None]}}),
    study(**{"00101020": {"vr": "DS"}, "00101030": {"vr": "DS"}, "00080050": {"vr": "SH", "Value": ["ACC1"]}}),
]

KEYS: list[dict[str, Any]] = [
    {"StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": ""},
    {
        "StudyInstanceUID": "", "PatientName": "", "PatientID": "", "StudyDate": "", "StudyTime": "",
        "AccessionNumber": "", "ModalitiesInStudy": "", "NumberOfStudyRelatedSeries": "",
        "NumberOfStudyRelatedInstances": "", "StudyDescription": "", "ReferringPhysicianName": "",
        "PatientSize": "", "PatientWeight": "", "RetrieveAETitle": "", "SeriesInstanceUID": "",
    },
    {"StudyInstanceUID": "", "PatientName": "DOE*"},
    {"StudyInstanceUID": "", "PatientName": "*山田*", "StudyDescription": ""},
    {"StudyInstanceUID": "", "ModalitiesInStudy": "MR", "StudyDate": "20200101-20201231"},
    {"StudyInstanceUID": "", "NumberOfStudyRelatedSeries": "3", "StudyDescription": "B"},
    {"StudyInstanceUID": "1.2.3.45\\1.2.3.4", "PatientID": "PID?"},
]
CHARSETS: list[list[str]] = [[], ["ISO_IR 100"], ["ISO_IR 192"], ["", "ISO 2022 IR 87"], ["ISO 2022 IR 58"], ["BOGUS"]]


def make_query(keys: dict[str, Any], charset: list[str]) -> Query:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    if charset:
        ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    ds.add_new(0x00090010, "LO", "")  # a private key, answered empty
    return parse_identifier(ds, Model.STUDY_ROOT)


@pytest.mark.parametrize("syntax", [IMPLICIT, EXPLICIT])
@pytest.mark.parametrize("charset", CHARSETS, ids=lambda c: "-".join(c) or "default")
@pytest.mark.parametrize("keys", KEYS, ids=[f"keys{i}" for i in range(len(KEYS))])
def test_direct_answer_equals_pydicom_answer(keys: dict[str, Any], charset: list[str], syntax: str) -> None:
    query = make_query(keys, charset)
    tags = {k.tag for k in query.keys} | {0x0020000D}
    writer = AnswerWriter(query, "GATEWAY", implicit=syntax == IMPLICIT)
    for obj in RESULTS:
        attrs = attributes_from_json(obj, tags)
        entity = dataset_from_json(obj, tags)
        assert writer.matches(attrs) == query.matches(entity), obj
        expected = encode_identifier(query.answer(entity, "GATEWAY"), syntax)
        assert writer.encode(attrs) == expected, obj
        plain = writer.encode_json(obj, {})
        assert plain is None or plain == expected, obj


@pytest.mark.parametrize(
    "attr",
    [
        {"vr": "SQ", "Value": [{}]},
        {"vr": "OB", "InlineBinary": "AAAA"},
        {"vr": "US", "Value": [1]},
    ],
)
def test_what_only_pydicom_writes_is_refused(attr: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        attributes_from_json({"00081030": attr}, {0x00081030})


def test_a_value_too_long_for_explicit_vr_is_refused() -> None:
    query = make_query({"StudyInstanceUID": "", "StudyDescription": ""}, [])
    attrs = attributes_from_json({"00081030": {"vr": "LO", "Value": ["X" * 70000]}}, {0x00081030})
    with pytest.raises(Unsupported):
        AnswerWriter(query, "GATEWAY", implicit=False).encode(attrs)
    assert len(AnswerWriter(query, "GATEWAY", implicit=True).encode(attrs)) > 70000


def test_plain_results_skip_the_general_encoder() -> None:
    """The usual answer (ASCII text values) is written by encode_json, not encode."""
    query = make_query(KEYS[1], ["ISO_IR 100"])
    plain = RESULTS[-1]
    assert AnswerWriter(query, "GATEWAY", implicit=True).encode_json(plain, {}) is not None
    assert AnswerWriter(query, "GATEWAY", implicit=False).encode_json(RESULTS[1], {}) is None  # Latin-1 name


def test_a_result_the_direct_path_refuses_is_still_answered() -> None:
    """FindService falls back to pydicom per result, and still answers that result."""
    results = [
        {"0020000D": {"vr": "UI", "Value": ["1.2.3.1"]}, "00081030": {"vr": "LO", "Value": ["X" * 70000]}},
        {"0020000D": {"vr": "UI", "Value": ["1.2.3.2"]}, "00081030": {"vr": "LO", "Value": ["SHORT"]}},
    ]

    class Upstream:
        async def search_for_studies(self, search: Any) -> AsyncIterator[dict[str, Any]]:
            for obj in results:
                yield obj

    async def collect() -> list[bytes]:
        query = make_query({"StudyInstanceUID": "", "StudyDescription": ""}, [])
        return [a async for a in FindService(Config(), Upstream()).answers(query, EXPLICIT)]  # type: ignore[arg-type]

    answers = asyncio.run(collect())
    assert len(answers) == 2
    assert b"1.2.3.1" in answers[0] and b"SHORT" in answers[1]
