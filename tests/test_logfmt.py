"""Log formatting: one line per event whatever the network sent, JSON fields, and
lines that may quote patient data kept out unless switched on at DEBUG."""

from __future__ import annotations

import json
import logging

from gateway.logfmt import PATIENT_DATA, JsonFormatter, PatientDataFilter, TextFormatter, sanitise


def record(msg: str, *args: object, level: int = logging.INFO, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("gateway.test", level, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_control_characters_are_escaped() -> None:
    assert sanitise("A\nB\rC\x1b[31m\u2028") == "A\\nB\\rC\\x1b[31m\\u2028"


def test_text_line_stays_one_line_with_fields() -> None:
    line = TextFormatter().format(record("from %s", "EVIL\nINFO forged", fields={"calling_ae": "X\nY", "n": 3}))
    assert "\n" not in line
    assert line.endswith("from EVIL\\nINFO forged calling_ae=X\\nY n=3")


def test_json_line_carries_fields() -> None:
    out = json.loads(JsonFormatter().format(record("delivered %d", 2, fields={"event": "delivery", "instances": 2})))
    assert out["message"] == "delivered 2" and out["event"] == "delivery" and out["instances"] == 2
    assert out["level"] == "INFO" and out["logger"] == "gateway.test" and out["time"].endswith("Z")


def test_patient_data_needs_the_switch_and_debug() -> None:
    off, on = PatientDataFilter(False), PatientDataFilter(True)
    body = record("error body: %s", "DOE^JOHN", level=logging.DEBUG, **PATIENT_DATA)
    assert not off.filter(body) and on.filter(body)
    assert not on.filter(record("error body: %s", "DOE^JOHN", level=logging.INFO, **PATIENT_DATA))
    assert off.filter(record("ordinary"))
