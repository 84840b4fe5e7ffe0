"""Reading STOW-RS responses in both encodings PS3.18 allows."""

from __future__ import annotations

import json

from gateway.dicomweb.stow import parse_stow_response


def test_json_referenced_and_failed() -> None:
    body = json.dumps(
        {
            "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.1"]}}]},
            "00081198": {
                "vr": "SQ",
                "Value": [
                    {"00081155": {"vr": "UI", "Value": ["1.2.2"]}, "00081197": {"vr": "US", "Value": [272]}},
                    {"00081155": {"vr": "UI", "Value": ["1.2.3"]}, "00081197": {"vr": "US", "Value": [45070]}},
                ],
            },
        }
    ).encode()
    parsed = parse_stow_response(body, "application/dicom+json")
    assert parsed.parsed and parsed.referenced == {"1.2.1"}
    assert parsed.failed == {"1.2.2": 0x0110, "1.2.3": 45070}


def test_xml() -> None:
    body = b"""<?xml version="1.0"?><NativeDicomModel>
    <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.1</Value></DicomAttribute>
    </Item></DicomAttribute>
    <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
      <DicomAttribute tag="00081155" vr="UI"><Value number="1">1.2.2</Value></DicomAttribute>
      <DicomAttribute tag="00081197" vr="US"><Value number="1">273</Value></DicomAttribute>
    </Item></DicomAttribute></NativeDicomModel>"""
    parsed = parse_stow_response(body, "application/dicom+xml")
    assert parsed.referenced == {"1.2.1"} and parsed.failed == {"1.2.2": 0x0111}


def test_empty_or_garbage_is_unparsed() -> None:
    assert not parse_stow_response(b"", "application/dicom+json").parsed
    assert not parse_stow_response(b"<html>oops", "text/html").parsed
