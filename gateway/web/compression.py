"""gzip for the facade's JSON answers (QIDO-RS matches, metadata), when asked.

A study's metadata is megabytes of JSON that compresses by ten times or more, and a
radiologist reading from home gets it over a VPN: sent whole it is what keeps a viewer
waiting before the first image. Level 1 keeps the cost at about 2 ms per MB; a body of
a megabyte or more is compressed in a worker thread (zlib releases the GIL) so the loop
keeps serving frames meanwhile. Frames and instances are left alone: compressed
syntaxes gain nothing, and native pixels cost more CPU than the bytes saved on a LAN.

A compressed answer carries the weak form of the body's ETag (RFC 9110 8.8.1: the two
encodings are equivalent, not byte-identical), which ``If-None-Match`` still matches.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Mapping

from aiohttp import web

from gateway.web.keys import CONFIG

MIN_BYTES = 1024  # below this the gzip header and a round of CPU gain nothing
LEVEL = 1
THREAD_BYTES = 1 << 20


def accepts_gzip(header: str | None) -> bool:
    """Whether ``Accept-Encoding`` admits gzip (RFC 9110 12.5.3): named with a non-zero
    q-value, or ``*`` admitted and gzip not refused by name."""
    if not header:
        return False
    named: dict[str, float] = {}
    for item in header.split(","):
        coding, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        named[coding.strip().lower()] = quality
    if "gzip" in named:
        return named["gzip"] > 0
    return named.get("*", 0.0) > 0


async def body_response(request: web.Request, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """``body`` as the answer, gzip-encoded when ``http.compress`` is on, the body is worth
    it and the client accepts gzip."""
    out = dict(headers or {})
    if not request.app[CONFIG].http.compress:
        return web.Response(body=body, content_type=content_type, headers=out)
    _vary(out)
    if len(body) < MIN_BYTES or not accepts_gzip(request.headers.get("Accept-Encoding")):
        return web.Response(body=body, content_type=content_type, headers=out)
    if len(body) >= THREAD_BYTES:
        packed = await asyncio.to_thread(gzip.compress, body, LEVEL, mtime=0)
    else:
        packed = gzip.compress(body, LEVEL, mtime=0)
    out["Content-Encoding"] = "gzip"
    if "ETag" in out and not out["ETag"].startswith("W/"):
        out["ETag"] = f"W/{out['ETag']}"
    return web.Response(body=packed, content_type=content_type, headers=out)


def not_modified_headers(request: web.Request, validators: Mapping[str, str]) -> dict[str, str]:
    """A 304's validators, as the 200 would have carried them to this client."""
    out = dict(validators)
    if request.app[CONFIG].http.compress:
        _vary(out)
        if accepts_gzip(request.headers.get("Accept-Encoding")) and "ETag" in out and not out["ETag"].startswith("W/"):
            out["ETag"] = f"W/{out['ETag']}"
    return out


def _vary(headers: dict[str, str]) -> None:
    """The answer depends on Accept-Encoding (for shared caches in between)."""
    headers["Vary"] = f"{headers['Vary']}, Accept-Encoding" if headers.get("Vary") else "Accept-Encoding"
