"""DICOM JSON values as the gateway takes them from an archive: a value that cannot be
one of its VR is taken as empty, never passed on to fail an encoder."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.model.json import element_from_json, json_values, json_vr


@pytest.mark.parametrize(
    ("vr", "values", "expected"),
    [
        ("DA", ["20240101", 20240101, None], ["20240101", "", ""]),
        ("IS", [3, 3.0, "4", " 5 ", "abc", 1.5, 2**31, -(2**31), float("inf"), 10**400, True], [3, 3, "4", " 5 ", "", "", "", -(2**31), "", "", ""]),
        ("DS", [1.5, "2.5e3", "x", float("nan")], [1.5, "2.5e3", "", ""]),
        ("LO", ["text", {"x": 1}, ["nested"], 7], ["text", "", "", ""]),
        ("PN", ["A^B", {"Alphabetic": "C^D"}, 5], ["A^B", "C^D", ""]),
        ("US", [512, "512", 1.0], [512, "", 1.0]),
        ("AT", ["00100010", "0010001", "zz100010"], [0x00100010, "", ""]),
    ],
)
def test_values_that_cannot_be_of_their_vr_are_empty(vr: str, values: list[Any], expected: list[Any]) -> None:
    assert json_values({"vr": vr, "Value": values}, vr) == expected


def test_a_lone_value_and_an_unknown_vr() -> None:
    assert json_values({"vr": "UI", "Value": "1.2.3"}, "UI") == ["1.2.3"]
    assert json_vr(0x00080050, {"vr": "XX"}) == "SH" and json_vr(0x00080050, {}) == "SH"
    assert json_vr(0x00091001, {"vr": 7}) == "UN"
    elem = element_from_json(0x00080050, {"vr": "XX", "Value": ["ACC1"]})
    assert (elem.VR, elem.value) == ("SH", "ACC1")
