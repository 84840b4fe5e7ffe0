"""The log line of a request aiohttp cannot parse quotes nothing of the request."""

from __future__ import annotations

import logging

import aiohttp.http_exceptions as errors

from gateway.web.malformed_requests import MalformedRequests, reason

MARKER = "ZEBRAPATIENT"


def test_no_kind_of_parse_error_quotes_the_request() -> None:
    # each message quotes the request its own way: bytes, a str repr, or bare
    for exc in (
        errors.LineTooLong(f"GET /studies?PatientName={MARKER}".encode(), 8190),
        errors.BadStatusLine(f"GET /studies?PatientName={MARKER}"),
        errors.BadHttpMethod(MARKER),
        errors.InvalidHeader(f"X-Name: {MARKER}"),
        errors.InvalidHeader(f"X-Name: {MARKER}".encode()),
        errors.InvalidURLError(f"/studies?PatientName={MARKER}"),
        errors.BadHttpMessage(f"Invalid character in Content-Length:\n\n  b'{MARKER}'\n  ^"),
        errors.BadHttpMessage(f"bad {MARKER}"),
    ):
        words = reason(exc)
        assert MARKER not in words and words.startswith(type(exc).__name__), words
    assert reason(errors.BadHttpMessage(f"Invalid character in chunk size:\n\n  b'{MARKER}'")) == (
        "BadHttpMessage: Invalid character in chunk size"
    )


def test_the_record_becomes_one_warning_without_its_traceback() -> None:
    exc = errors.LineTooLong(MARKER.encode(), 8190)
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("10.0.0.7",), (type(exc), exc, None))
    assert MalformedRequests().filter(record)
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert record.getMessage() == (
        "malformed HTTP request from 10.0.0.7 refused (400): LineTooLong: a request line or header longer than the server reads"
    )
    other = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request", (), (ValueError, ValueError("x"), None))
    assert MalformedRequests().filter(other) and other.levelno == logging.ERROR and other.exc_info is not None
