"""The embedded archive's kept metadata texts, pointed at the facade without parsing
(`pointed_text`): byte for byte what pointing the parsed objects and serialising them
gives, the answer the facade gave before it kept texts."""

from __future__ import annotations

import copy
import json

from gateway.upstream.archive_metadata import metadata_text
from gateway.upstream.base import JsonObject, MetadataText
from gateway.web.bulk_uris import point_at_facade, pointed_text

STUDY, SERIES = "1.2.3", "1.2.3.4"


def instance(sop: str) -> dict[str, JsonObject]:
    """An instance's metadata as the embedded archive gives it: relative BulkDataURIs
    at the top and in nested items, and text values that look like them."""
    return {
        "00080018": {"vr": "UI", "Value": [sop]},
        "0008103E": {"vr": "LO", "Value": ['"BulkDataURI": "bulkdata/00282000" ü']},
        "0020000D": {"vr": "UI", "Value": [STUDY]},
        "0020000E": {"vr": "UI", "Value": [SERIES]},
        "00282000": {"vr": "OB", "BulkDataURI": "bulkdata/00282000"},
        "00540016": {
            "vr": "SQ",
            "Value": [
                {"00181072": {"vr": "TM", "Value": ["120000"]}},
                {"00189089": {"vr": "OB", "BulkDataURI": "bulkdata/00540016/1/00189089"},
                 "0040A730": {"vr": "SQ", "Value": [{"7FE00010": {"vr": "OW", "BulkDataURI": "bulkdata/00540016/1/0040A730/0/7FE00010"}}]}},
            ],
        },
        "7FE00010": {"vr": "OW", "BulkDataURI": "bulkdata/7FE00010"},
    }


def test_a_kept_text_pointed_at_the_facade_is_what_the_objects_give() -> None:
    invalid = {**instance("x y"), "00080018": {"vr": "UI", "Value": ["x y"]}}
    objects = [instance("1.2.3.4.1"), instance("1.2.3.4.2"), invalid]
    for root in ("http://127.0.0.1:8080/dicom-web", 'https://gw.example:8443/dicom-web "ü"\\'):
        kept = [MetadataText(STUDY, SERIES, json.dumps(o["00080018"]["Value"][0])[1:-1], metadata_text(o)) for o in objects]
        answer = "[" + ", ".join(pointed_text(k, root) for k in kept) + "]"
        pointed = copy.deepcopy(objects)
        for obj in pointed:
            point_at_facade(obj, root, STUDY)
        assert answer == json.dumps(pointed, ensure_ascii=False)
        got = json.loads(answer)
        base = f"{root}/studies/{STUDY}/series/{SERIES}/instances/1.2.3.4.2/bulkdata/"
        nested = got[1]["00540016"]["Value"][1]
        assert nested["0040A730"]["Value"][0]["7FE00010"]["BulkDataURI"] == base + "00540016/1/0040A730/0/7FE00010"
        assert got[1]["0008103E"] == objects[1]["0008103E"]  # a value is never rewritten
        assert got[2]["7FE00010"]["BulkDataURI"] == "bulkdata/7FE00010"  # no valid UIDs: left as the archive's
