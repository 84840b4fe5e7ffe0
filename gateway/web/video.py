"""Video instances as video (PS3.18 8.7.4 rendered media types ``video/mpeg``,
``video/mp4``, ``video/H265``): an endoscopy or ultrasound clip stored in an MPEG-2,
H.264 or HEVC transfer syntax is answered as its stream, the Pixel Data fragments'
values joined (PS3.5 A.4), untouched.

A viewer plays it in a ``<video>`` element pointed at the instance's rendered resource
(OHIF Viewer 3 does, asking nothing but ``*/*``), or at its Pixel Data bulk data with
``?accept=video/mp4``. A browser then asks byte ranges (``Range: bytes=0-``, and
another range at each seek) and will not seek in an answer without them, so ranges are
answered (206, one range; several ranges get the whole stream, as RFC 9110 allows).
The stream is read from the retrieved instance range by range, never whole. From a
remote upstream, which can send the instance only whole, the stream is kept in the
facade's cache after the first request (up to a quarter of ``http.cache.max_mb``), so a
seek does not retrieve the instance again.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import BinaryIO

from aiohttp import web

from gateway.codecs.errors import TranscodeError
from gateway.codecs.stream import fragment_spans
from gateway.dicomweb.accept import MediaRange, parse_accept
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.transcode import part10_file
from gateway.upstream.base import JsonObject, Retrieved
from gateway.web.common import NotAcceptable, image_set_id, send_streamed
from gateway.web.keys import CACHE

log = logging.getLogger("gateway.web")

# The rendered media type of each video transfer syntax (PS3.18 Table 8.7.4-2).
MEDIA_OF_SYNTAX = {
    "1.2.840.10008.1.2.4.100": "video/mpeg",
    "1.2.840.10008.1.2.4.101": "video/mpeg",
    **dict.fromkeys([f"1.2.840.10008.1.2.4.{n}" for n in range(102, 107)], "video/mp4"),
    "1.2.840.10008.1.2.4.107": "video/H265",
    "1.2.840.10008.1.2.4.108": "video/H265",
}
# Names clients ask them by (OHIF: video/mpeg2), lower case.
ALIASES = {"video/mpeg2": "video/mpeg", "video/h265": "video/H265"}
# Video Endoscopic, Microscopic and Photographic Image Storage: what a ``*/*`` asks of
# them is their video.
VIDEO_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.77.1.1.1", "1.2.840.10008.5.1.4.1.1.77.1.2.1", "1.2.840.10008.5.1.4.1.1.77.1.4.1"})
CHUNK = 1 << 20


def _video_media(r: MediaRange) -> str | None:
    """The video media type a range names (``video/*``: "*"), None for another kind."""
    if r.media == "video/*":
        return "*"
    if r.media.startswith("video/"):
        return ALIASES.get(r.media, r.media)
    return None


def asks_video(accept: str | None, metadata: JsonObject) -> bool:
    """Whether a rendered request is for the instance's video: the Accept names a video
    type before any image type, or admits anything (``*/*``) of an instance that is
    video by its SOP class or by the transfer syntax the archive says it has."""
    for r in parse_accept(accept):
        if _video_media(r) is not None:
            return True
        if r.media.startswith("image/") or r.media == "multipart/related":
            return False
        if r.media in ("*/*", "*"):
            return _is_video(metadata)
    return False


def _is_video(metadata: JsonObject) -> bool:
    sop_class = ((metadata.get("00080016") or {}).get("Value") or [""])[0]
    available = (metadata.get("00083002") or {}).get("Value") or []
    return sop_class in VIDEO_CLASSES or any(ts in MEDIA_OF_SYNTAX for ts in available)


def acceptable(accept: str | None, media: str) -> bool:
    """Whether the Accept admits a video answer of type ``media``."""
    for r in parse_accept(accept):
        named = _video_media(r)
        if named in ("*", media) or r.media in ("*/*", "*"):
            return True
    return False


def _spans(retrieved: Retrieved) -> tuple[str, list[tuple[int, int]]]:
    with part10_file(retrieved) as fp:
        syntax, spans = fragment_spans(fp)
    return str(syntax), spans


async def stored_video(retrieved: Retrieved) -> tuple[str, list[tuple[int, int]]] | None:
    """The video media type and fragment spans of a retrieved instance, None when its
    pixel data is not stored as video."""
    try:
        syntax, spans = await asyncio.to_thread(_spans, retrieved)
    except TranscodeError:
        return None
    media = MEDIA_OF_SYNTAX.get(syntax)
    return (media, spans) if media is not None and spans else None


def _read(retrieved: Retrieved, spans: Sequence[tuple[int, int]], start: int, size: int) -> bytes:
    """Bytes ``[start, start + size)`` of the stream the fragments make (blocking)."""
    out = bytearray()
    position = 0
    for offset, length in spans:
        if position + length > start and size > len(out):
            skip = max(start - position, 0)
            want = min(length - skip, size - len(out))
            piece = retrieved.read(offset + skip, want)
            if len(piece) != want:
                raise TranscodeError("the video's pixel data ends early")
            out += piece
        position += length
        if len(out) >= size:
            break
    return bytes(out)


def byte_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The one range ``Range`` asks of ``total`` bytes as [start, end), None for the
    whole (no header, several ranges, or one this does not read, which RFC 9110 lets a
    server ignore); raises HTTPRequestRangeNotSatisfiable for a range wholly past the end."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", (header or "").strip())
    if match is None or not (match[1] or match[2]):
        return None
    if not match[1]:  # the last N bytes
        suffix = int(match[2])
        if not suffix:
            _unsatisfiable(total)
        return max(total - suffix, 0), total
    start = int(match[1])
    end = min(int(match[2]) + 1, total) if match[2] else total
    if start >= total:
        _unsatisfiable(total)
    return (start, end) if end > start else None


def _unsatisfiable(total: int) -> None:
    raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{total}"})


# Bytes [start, start + size) of a video stream (blocking).
Read = Callable[[int, int], bytes]


async def answer_video(request: web.Request, read: Read, total: int, media: str, accept: str | None) -> web.StreamResponse:
    """The ``total``-byte video stream, whole or the range asked; 406 when the Accept
    does not admit the stored kind (no video is transcoded)."""
    if not acceptable(accept, media):
        raise NotAcceptable(f"this instance is stored as {media} video and served only as such")
    asked = byte_range(request.headers.get("Range"), total)
    start, end = asked if asked is not None else (0, total)
    response = web.StreamResponse(status=206 if asked is not None else 200)
    response.headers.update({"Content-Type": media, "Accept-Ranges": "bytes", "Vary": "Accept"})
    if asked is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
    response.content_length = end - start

    async def chunks() -> AsyncIterator[bytes]:
        for at in range(start, end, CHUNK):
            yield await asyncio.to_thread(read, at, min(CHUNK, end - at))

    try:
        return await send_streamed(request, response, chunks())
    except ConnectionResetError:  # a browser drops a range it no longer needs
        return response
    except (TranscodeError, OSError) as exc:
        log.error("video of %s: failed after the answer began: %s", request.path, exc)
        if request.transport is not None:
            request.transport.close()
        return response


def _copy(retrieved: Retrieved, spans: Sequence[tuple[int, int]], total: int, out: BinaryIO) -> None:
    """Write the stream the fragments make into ``out`` (blocking)."""
    for at in range(0, total, CHUNK):
        out.write(_read(retrieved, spans, at, min(CHUNK, total - at)))


async def video_of(
    request: web.Request, ref: InstanceRef, fetch: Callable[[], Awaitable[Retrieved]], accept: str | None
) -> web.StreamResponse | None:
    """The video stream of the instance ``fetch`` retrieves; when it is not stored as
    video, None if the Accept admits an image instead (a video-class instance stored as
    JPEG frames, asked ``*/*``: rendered as an image), else 406.

    From a remote upstream the stream is kept in the facade's cache (when it fits in a
    quarter of it), so the ranges that follow, a seek each, are read from there; a
    request that comes while another retrieves the instance waits for that one (a
    browser asks its first ranges at once, each would retrieve the whole instance)."""
    cache = request.app[CACHE]
    image_set = image_set_id(request)
    uids = (ref.study_uid, ref.series_uid, ref.sop_instance_uid, image_set)
    if cache is not None and (kept := await cache.video_kept(*uids)) is not None:
        return await answer_video(request, kept.read, kept.size, kept.media, accept)
    generation = cache.generation(ref.study_uid) if cache is not None else None
    # the requests for this stream that come meanwhile wait for it to be kept
    let_go = cache.fetching_video(*uids) if cache is not None else lambda: None
    try:
        retrieved = await fetch()
        try:
            stored = await stored_video(retrieved)
            if stored is None:
                if not _admits_images(accept):
                    raise NotAcceptable("this instance is not stored as video")
                return None
            media, spans = stored
            total = sum(length for _, length in spans)
            if cache is not None and acceptable(accept, media):
                kept = await cache.keep_video(*uids, media, total, partial(_copy, retrieved, spans, total), generation)
                let_go()
                if kept is not None:
                    return await answer_video(request, kept.read, kept.size, media, accept)
            return await answer_video(request, partial(_read, retrieved, spans), total, media, accept)
        finally:
            retrieved.release()
    finally:
        let_go()


def _admits_images(accept: str | None) -> bool:
    return any(r.media.startswith("image/") or r.media in ("*/*", "*") for r in parse_accept(accept))
