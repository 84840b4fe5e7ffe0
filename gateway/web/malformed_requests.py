"""HTTP requests aiohttp cannot parse, logged as one line without what they carried.

aiohttp answers a request it cannot parse (a request line or header over 8190 bytes,
a bad Content-Length, a broken chunk of a chunked body) with 400, and logs it at ERROR
with a traceback whose message quotes the offending bytes. Any client can send such a
request at will, so each would put a traceback in the log; and the quoted bytes can be
patient data: a QIDO-RS search by PatientName whose query string is too long is quoted
up to its first hundred bytes. What an admin needs is which client sent what kind of
malformed request. `MalformedRequests` turns those records into one WARNING saying
that, the quoted bytes cut off, and leaves every other record of aiohttp's alone
(a failure in one of our handlers keeps its traceback).
"""

from __future__ import annotations

import logging
import re

from aiohttp.http_exceptions import HttpProcessingError

# Where aiohttp's messages start quoting the request: "...: b'...'", "bytearray(b'...')".
_QUOTE = re.compile(r"""[:\s]*(?:bytearray\()?b['"]""")


def reason(exc: HttpProcessingError) -> str:
    """The kind of error and aiohttp's words for it, without the bytes it quotes."""
    lines = str(exc.message or "").strip().splitlines()
    words = _QUOTE.split(lines[0], maxsplit=1)[0].rstrip(": .") if lines else ""
    return f"{type(exc).__name__}: {words}" if words else type(exc).__name__


class MalformedRequests(logging.Filter):
    """On the ``aiohttp.server`` logger: a record of a request that could not be parsed
    becomes "malformed HTTP request from ADDRESS refused (400): KIND: words", at
    WARNING at most, without its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        remote = args[0] if len(args) == 1 else "an unknown address"
        record.msg = "malformed HTTP request from %s refused (%s): %s"
        record.args = (remote, exc.code or 400, reason(exc))
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def install() -> None:
    """Add the filter to aiohttp's server logger, once per process."""
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server.filters):
        server.addFilter(MalformedRequests())
