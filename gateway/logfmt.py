"""Log lines an admin can trust: one event per line, whatever the network sent.

AE titles, UIDs and error texts come from peers; a newline or an escape sequence in
one of them must not forge a second log line or rewrite a terminal. Both formats
escape every control character of the message (``\\n`` becomes the two characters
``\\n``), so the escaping holds at every call site without each one remembering it.

``json``: one object per line (``time``, ``level``, ``logger``, ``message``, plus the
``fields`` a call passes with ``extra={"fields": {...}}``), for log shippers.
``text``: ``time level logger: message``, the fields appended as ``key=value``.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

FORMATS = ("text", "json")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match[str]) -> str:
    char = match.group(0)
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char, f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}")


def sanitise(text: str) -> str:
    """``text`` with every control character escaped, so it stays on one line."""
    return _CONTROL.sub(_escape, text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


def _stamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """``2026-11-26T04:40:00.123Z INFO gateway.dimse: message key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_stamp(record)} {record.levelname} {record.name}: {sanitise(record.getMessage())}"
        extra = " ".join(f"{k}={sanitise(str(v))}" for k, v in _fields(record).items())
        if extra:
            line += " " + extra
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; a traceback goes in ``exception``, not on new lines."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _stamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": sanitise(record.getMessage()),
        }
        for key, value in _fields(record).items():
            out.setdefault(key, value if isinstance(value, (int, float, bool)) or value is None else sanitise(str(value)))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


PATIENT_DATA = {"patient_data": True}  # ``extra=`` of a line that may quote patient data


class PatientDataFilter(logging.Filter):
    """Drops lines marked with `PATIENT_DATA` unless ``logging.include_patient_data``
    is on, and lets them through below DEBUG only: patient names, IDs and birth dates
    never reach INFO and above."""

    def __init__(self, include: bool) -> None:
        super().__init__()
        self.include = include

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "patient_data", False):
            return True
        return self.include and record.levelno <= logging.DEBUG


def formatter(kind: str) -> logging.Formatter:
    """The formatter for ``--log-format``."""
    return JsonFormatter() if kind == "json" else TextFormatter()
