"""HTTP requests aiohttp cannot parse, logged as one line without what they carried.

aiohttp answers a request it cannot parse (a request line or header over 8190 bytes,
a bad Content-Length, a broken chunk of a chunked body) with 400, and logs it at ERROR
with a traceback whose message quotes the offending bytes. Any client can send such a
request at will, so each would put a traceback in the log; and the quoted bytes can be
patient data: a QIDO-RS search by PatientName whose query string is too long is quoted
up to its first hundred bytes. What an admin needs is which client sent what kind of
malformed request. `MalformedRequests` turns those records into one WARNING saying
that in words that quote nothing of the request, and leaves every other record of
aiohttp's alone (a failure in one of our handlers keeps its traceback).
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, InvalidHeader, InvalidURLError, LineTooLong

from gateway.log_throttle import Throttle, left_out

# Words of our own for the errors whose messages quote the request in their own ways
# (a str repr, bytes, or the URL bare): none of the message is logged.
_KINDS: dict[type[HttpProcessingError], str] = {
    LineTooLong: "a request line or header longer than the server reads",
    BadStatusLine: "not an HTTP request line",  # BadHttpMethod too
    InvalidHeader: "an invalid header",
    InvalidURLError: "an invalid URL",
}


def reason(exc: HttpProcessingError) -> str:
    """The kind of error in words that quote nothing of the request: ours for the
    kinds above; else llhttp's own description when the message has its form (the
    description, a blank line, then the bytes), else the kind alone."""
    kind = type(exc).__name__
    words = next((w for cls, w in _KINDS.items() if isinstance(exc, cls)), None)
    if words is None:
        message = str(exc.message or "")
        if "\n\n" in message:
            words = message.split("\n", 1)[0].rstrip(": ")
    return f"{kind}: {words}" if words else kind


class MalformedRequests(logging.Filter):
    """On the ``aiohttp.server`` logger: a record of a request that could not be parsed
    becomes "malformed HTTP request from ADDRESS refused (400): KIND: words", at
    WARNING at most, without its traceback, and at most `log_throttle.BURST` a minute."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        admitted, held = self.throttle.admit()
        if not admitted:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        remote = args[0] if len(args) == 1 else "an unknown address"
        record.msg = "malformed HTTP request from %s refused (%s): %s%s"
        record.args = (remote, exc.code or 400, reason(exc), left_out(held))
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def install() -> None:
    """Add the filter to aiohttp's server logger, once per process."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
