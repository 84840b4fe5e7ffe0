"""What the facade's route modules share: path UIDs, the one table from errors to HTTP
answers, and a streamed ``multipart/related`` response."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Mapping

from aiohttp import web

from gateway.codecs.errors import TranscodeError
from gateway.dicomweb.accept import with_query
from gateway.log_throttle import Throttle, left_out
from gateway.model.query import QueryError
from gateway.spill import SpillFull
from gateway.uids import is_valid_uid
from gateway.upstream.errors import NotFound, NotSupported, UpstreamAuthError, UpstreamRejected, UpstreamUnavailable
from gateway.web.keys import UPSTREAM

log = logging.getLogger("gateway.web")
# An archive that refuses the gateway, or a disk at its floor, fails every request
# alike: a few lines a minute say so.
_ARCHIVE_REFUSED = Throttle()
_SPILL_FULL = Throttle()
# How long a client is asked to wait when the spool's disk is at its floor.
SPILL_RETRY_AFTER = 30
# What HealthImaging's image set IDs look like (its API's pattern).
IMAGE_SET_ID = re.compile(r"[0-9a-z]{32}")


class NotAcceptable(Exception):
    """Nothing the client accepts can be produced; the message names what can."""


def accept_of(request: web.Request) -> str | None:
    """The Accept a DICOMweb resource negotiates with: the header, preceded by the
    media types of the request's ``accept`` query parameters (`with_query`)."""
    return with_query(request.headers.get("Accept"), request.query.getall("accept", []))


def text_error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    """A plain-text error answer (never a traceback, never a value from the request)."""
    return web.Response(status=status, text=message.rstrip() + "\n", headers=dict(headers or {}))


def image_set_id(request: web.Request) -> str | None:
    """The ``imageSetId`` a request under ``/datastore/{datastoreId}`` names, when the
    upstream is HealthImaging (the only archive with image sets); None otherwise, so
    other upstreams accept the parameter and ignore it. HTTPBadRequest for a value
    that cannot be an image set ID."""
    value = request.query.get("imageSetId")
    if not value or "datastoreId" not in request.match_info or request.app[UPSTREAM].kind != "healthimaging":
        return None
    if not IMAGE_SET_ID.fullmatch(value):
        raise web.HTTPBadRequest(text="imageSetId is not a HealthImaging image set ID (32 lowercase letters and digits)\n")
    return value


def subject(what: str, request: web.Request) -> str:
    """``what`` a route does, naming the image set it reads when the request names one,
    so a 404 says where the instance was looked for."""
    named = image_set_id(request)
    return f"{what} in image set {named}" if named else what


def path_uids(request: web.Request) -> dict[str, str]:
    """The study/series/instance UIDs of the path; HTTPBadRequest for one that is not
    a UID (so nothing odd ever reaches a URL or a file name upstream), or for an
    ``imageSetId`` that is not an image set ID."""
    image_set_id(request)
    out = {}
    for name in ("study", "series", "instance"):
        value = request.match_info.get(name)
        if value is None:
            continue
        if not is_valid_uid(value):
            raise web.HTTPBadRequest(text=f"the {name} in the path is not a valid UID\n")
        out[name] = value
    return out


def request_root(request: web.Request) -> str:
    """The DICOMweb root URL the request came in under (base path or an alias root),
    for URLs handed back to the client (RetrieveURL, BulkDataURI)."""
    path = request.path
    root = path[: path.find("/studies")] if "/studies" in path else path
    return f"{request.scheme}://{request.host}{root}"


def error_response(exc: BaseException, what: str) -> web.Response:
    """The one table from a failure to an HTTP answer; the message names keys and
    reasons, never attribute values. The client closing its connection is raised
    again: nothing can be answered, and `gateway.web.client_gone` ends it quietly."""
    if isinstance(exc, ConnectionResetError):
        raise exc
    if isinstance(exc, NotAcceptable):
        return text_error(406, str(exc))
    if isinstance(exc, QueryError):
        return text_error(400, str(exc))
    if isinstance(exc, NotFound):
        return text_error(404, f"{what}: not found")
    if isinstance(exc, UpstreamAuthError):
        _archive_refused(what, exc)
        return text_error(502, f"{what}: the archive refused the gateway's credentials")
    if isinstance(exc, NotSupported):
        return text_error(501, f"{what}: the archive does not support this ({exc})")
    if isinstance(exc, UpstreamRejected):
        if exc.status in (400, 404, 406, 409, 410):
            return text_error(exc.status, f"{what}: {exc}")
        _archive_refused(what, exc)
        return text_error(502, f"{what}: the archive refused: {exc}")
    if isinstance(exc, UpstreamUnavailable):
        headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else {}
        return text_error(503, f"{what}: the archive is unavailable: {exc}", headers)
    if isinstance(exc, TimeoutError):
        return text_error(504, f"{what}: the archive did not answer in time")
    if isinstance(exc, SpillFull):
        admitted, held = _SPILL_FULL.admit()
        if admitted:
            log.warning("%s: answered 503: %s%s", what, exc.strerror, left_out(held))
        return text_error(503, f"{what}: the gateway is short of disk space, try again later", {"Retry-After": str(SPILL_RETRY_AFTER)})
    if isinstance(exc, TranscodeError):
        return text_error(406, f"{what}: cannot convert: {exc}")
    if isinstance(exc, RecursionError):
        # Only data nests without bound here: an instance whose sequences nest
        # hundreds deep (the gateway refuses such instances, an archive may hold them).
        log.warning("%s: the data nests sequences too deep to read or encode", what)
        return text_error(502, f"{what}: the instance nests sequences too deep to read or encode")
    log.error("%s failed: internal error %s", what, type(exc).__name__)
    log.debug("internal error", exc_info=exc)
    return text_error(500, f"{what}: internal error ({type(exc).__name__})")


def _archive_refused(what: str, exc: UpstreamRejected) -> None:
    """A 502 is the archive's doing, not the client's: the admin hears of it."""
    admitted, held = _ARCHIVE_REFUSED.admit()
    if admitted:
        log.warning("%s: answered 502, the archive refused or answered what cannot be used: %s%s", what, exc, left_out(held))


async def _to_client(write: Awaitable[None]) -> None:
    """Await one write of an answer. aiohttp raises ConnectionResetError for a write to
    a connection already closing, but a bare ConnectionError ("Connection lost") when
    the client goes away while the write waits for the socket to drain: a large answer
    to a viewer that stopped reading it, then cancelled it. Both are the client gone,
    raised as the ConnectionResetError the routes and `gateway.web.client_gone` take
    for that (the second was logged at ERROR with a traceback, and counted a 500)."""
    try:
        await write
    except ConnectionResetError:
        raise
    except ConnectionError as exc:
        raise ConnectionResetError(f"the client's connection was lost: {exc}") from exc


async def send_streamed(request: web.Request, response: web.StreamResponse, chunks: AsyncIterator[bytes]) -> web.StreamResponse:
    """Send a one-part answer chunk by chunk; a HEAD request gets its status and
    headers only (aiohttp would otherwise put the chunks on the wire unframed)."""
    await response.prepare(request)
    if request.method != "HEAD":
        async for chunk in chunks:
            await _to_client(response.write(chunk))
    await _to_client(response.write_eof())
    return response


class MultipartStream:
    """A ``multipart/related`` answer written part by part as each becomes ready, so a
    series of any size never sits in memory. Each part's header line is spelled
    exactly ``Content-Type:`` (some viewers match it case-sensitively).

    For a HEAD request nothing after the headers is written, and ``head`` tells the
    route it may stop as soon as the answer has begun (its headers are then final)."""

    def __init__(self, request: web.Request, part_type: str, extra: str = "", status: int = 200) -> None:
        self.request = request
        self.head = request.method == "HEAD"
        self.boundary = f"dicomgw-{secrets.token_hex(12)}"
        self.response = web.StreamResponse(status=status)
        self.response.content_type = "multipart/related"
        self.response.headers["Content-Type"] = f'multipart/related; type="{part_type}"; boundary={self.boundary}{extra}'
        self.parts = 0

    async def start(self) -> None:
        if not self.response.prepared:
            await self.response.prepare(self.request)

    async def part(self, content_type: str, chunks: list[bytes] | None = None, extra_headers: str = "") -> None:
        """Begin a part; its content follows with `write` unless ``chunks`` are given."""
        await self.start()
        self.parts += 1
        if self.head:
            return
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n{extra_headers}\r\n"
        if self.parts > 1:
            head = "\r\n" + head
        await _to_client(self.response.write(head.encode("latin-1")))
        for chunk in chunks or ():
            await _to_client(self.response.write(chunk))

    async def write(self, data: bytes | memoryview) -> None:
        if not self.head:
            await _to_client(self.response.write(bytes(data)))

    async def finish(self) -> web.StreamResponse:
        await self.start()
        if self.head:
            await _to_client(self.response.write_eof())
            return self.response
        tail = f"--{self.boundary}--\r\n"
        await _to_client(self.response.write(((("\r\n") if self.parts else "") + tail).encode("latin-1")))
        await _to_client(self.response.write_eof())
        return self.response
