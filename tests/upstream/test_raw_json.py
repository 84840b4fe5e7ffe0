"""`element_json`: the DICOM JSON of plain elements from their bytes must be exactly
pydicom's, and anything not plain must be left to pydicom (None).

The corpus test (`test_archive_writer.py`) holds whole headers to pydicom's JSON; these
cases are the values a corpus seldom has: padded and signed numbers, empty values
among several, non-ASCII and ISO 2022 text, wrong lengths, the LUT descriptors
pydicom mends, UN for a known attribute, implicit VR, private attributes."""

from __future__ import annotations

import io
import json
import struct
import warnings
from typing import Any

import pydicom
import pytest
from pydicom.datadict import DicomDictionary, dictionary_VR

from gateway.upstream.archive_writer import converted
from gateway.upstream.raw_json import element_json

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
LONG_LENGTH_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _tag_with_vr(vr: str) -> int:
    """A public attribute whose dictionary VR is ``vr`` (for implicit VR files)."""
    return next(tag for tag, entry in sorted(DicomDictionary.items()) if entry[0] == vr and tag >> 16 not in (0x0002, 0x7FE0))


def _element(tag: int, vr: str, value: bytes, explicit: bool) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in LONG_LENGTH_VRS:
        return head + vr.encode() + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr.encode() + struct.pack("<H", len(value)) + value


def _file(syntax: str, elements: bytes) -> io.BytesIO:
    uid = syntax.encode() + b"\0" * (len(syntax) % 2)
    meta = _element(0x00020010, "UI", uid, True)
    group = _element(0x00020000, "UL", struct.pack("<I", len(meta)), True)
    return io.BytesIO(b"\0" * 128 + b"DICM" + group + meta + elements)


def _pydicoms(ds: pydicom.Dataset, raw: Any) -> str:
    """What `header_json` gives through pydicom: converted, then encoded under strict
    reading; 'raises' where either step raises."""
    try:
        elem = converted(ds, raw)
        with pydicom.config.strict_reading():
            return json.dumps(elem.to_json_dict(None, 65536))
    except Exception:  # noqa: BLE001 - compared, not raised
        return "raises"


VALUES: dict[str, list[bytes]] = {
    "IS": [b"007 ", b"+5", b"-12", b"1\\2\\3 ", b"1.0", b" 5", b"12345678901", b"123456789012", b"1\\\\2", b"  ", b"", b"5\x00"],
    "DS": [b"1.5 ", b" 1.5", b"1e3", b"-.5", b"1\\2.50", b"1.0.0", b"nan", b"12345678901234567", b"+1.5E-3", b"0.", b"1\\\\2", b" "],
    "CS": [b"ORIGINAL\\PRIMARY\\AXIAL", b"A \\B ", b"A\\\\B", b"\\", b"  ", b"A\x00", b" LEAD"],
    "LO": [b"Caf\xe9", b"a\x1b$Bb", b"x\\y ", b"x\\", b"  x  ", b"tab\there", b"\x00\x00"],
    "SH": [b"ABC ", b"A\\B"],
    "LT": [b"line1\\line2  ", b"text\r\n", b"  "],
    "UT": [b"long text \\ with backslash "],
    "UC": [b"one\\two "],
    "UI": [b"1.2.3\x00", b"1.2\\3.4", b"1.2.840.10008.1.2.1"],
    "AE": [b" AE1 \\ AE2", b"STORESCP"],
    "UR": [b"http://x/ \t", b"http://x/a\\b "],
    "DA": [b"20240101", b"20240101\\20240102", b"2024 "],
    "TM": [b"101010.5 ", b"10"],
    "DT": [b"20240101101010"],
    "AS": [b"045Y"],
    "US": [struct.pack("<H", 7), struct.pack("<3H", 1, 2, 65535), b"\x01\x02\x03"],
    "SS": [struct.pack("<h", -3), struct.pack("<2h", -1, 5)],
    "UL": [struct.pack("<I", 4000000000)],
    "SL": [struct.pack("<2i", -7, 7)],
    "FL": [struct.pack("<f", 0.3), struct.pack("<2f", float("nan"), -1.5), b"\0\0"],
    "FD": [struct.pack("<d", 1e-300), struct.pack("<d", float("inf"))],
    "SV": [struct.pack("<q", -(2**40))],
    "UV": [struct.pack("<Q", 2**63)],
    "OB": [b"\x00\x01\x02", b"\xff\xfe"],
    "OW": [b"\x01\x00\x02\x00"],
    "OF": [struct.pack("<2f", 1.0, 2.0)],
    "OD": [struct.pack("<d", 3.0)],
    "OL": [struct.pack("<I", 9)],
    "PN": [b"Doe^John", b"A^B=C^D"],
    "AT": [struct.pack("<HH", 0x0010, 0x0010)],
}
CASES = [(vr, value) for vr, values in VALUES.items() for value in values]


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
@pytest.mark.parametrize(("vr", "value"), CASES, ids=[f"{vr}-{value!r}" for vr, value in CASES])
def test_a_plain_element_is_what_pydicom_gives(vr: str, value: bytes, explicit: bool) -> None:
    tag = _tag_with_vr(vr)
    charset = _element(0x00080005, "CS", b"ISO_IR 100", explicit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(_file(EXPLICIT_LE if explicit else IMPLICIT_LE, charset + _element(tag, vr, value, explicit)))
        raw = next(raw for raw in ds.elements() if raw.tag == tag)
        ours = element_json(raw)
        if ours is not None:
            assert json.dumps(ours) == _pydicoms(ds, raw)


@pytest.mark.parametrize(
    ("tag", "vr", "value"),
    [
        (0x00283002, "SS", struct.pack("<3h", -4096, 0, 16)),  # LUT Descriptor: pydicom reads its first value unsigned
        (0x00080060, "UN", b"CT"),  # Modality sent as UN: pydicom reads it as CS
        (0x00091010, "LO", b"private"),  # implicit VR private: its VR needs its creator
        (0x00081140, "SQ", b""),  # a sequence
        (0x00100010, "PN", b"Doe^John"),  # a name: its components
    ],
)
def test_what_pydicom_settles_is_left_to_pydicom(tag: int, vr: str, value: bytes) -> None:
    explicit = not (tag >> 16) & 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(_file(EXPLICIT_LE if explicit else IMPLICIT_LE, _element(tag, vr, value, explicit)))
        raw = next(raw for raw in ds.elements() if raw.tag == tag)
        assert element_json(raw) is None
        if tag == 0x00283002:
            assert ds[tag].value[0] == 61440


def test_the_cases_cover_every_vr_it_answers_for() -> None:
    """Each VR `element_json` encodes has cases above, plain and not."""
    answered = {vr for vr, value in CASES if _answer(vr, value) is not None}
    assert answered >= {"IS", "DS", "CS", "LO", "SH", "LT", "UT", "UC", "UI", "AE", "UR", "DA", "TM", "DT", "AS"}
    assert answered >= {"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "OB", "OW", "OF", "OD", "OL"}
    assert {vr for vr, value in CASES if _answer(vr, value) is None} >= {"IS", "DS", "CS", "LO", "PN", "AT", "US"}
    assert dictionary_VR(_tag_with_vr("SS")) == "SS"


def _answer(vr: str, value: bytes) -> dict[str, Any] | None:
    tag = _tag_with_vr(vr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(_file(EXPLICIT_LE, _element(tag, vr, value, True)))
    return element_json(next(raw for raw in ds.elements() if raw.tag == tag))
