"""WADO-RS (PS3.18 10.4): instances, series and studies, metadata and frames.

Instances go as stored (``transfer-syntax=*``) or converted by the retrieval
engine's transcoder; series and studies stream as ``multipart/related`` one part per
instance as each arrives, never held whole (one RetrieveSeries/Study request upstream
where its capabilities allow, else the instance listing and one request per
instance, and anything the bulk answer lacked fetched one by one after it).

Frames are asked of the archive as stored and each is checked against the instance's
pixel description before use (`gateway.codecs.frame_check`): a label the bytes
contradict is corrected, and the gateway converts the frame itself when the client
asked for another syntax.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pydicom
from aiohttp import web

from gateway.audit.auditor import StudyTally, tally_of
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frame_check import actual_syntax, convert_frame, convertible, same_bytes
from gateway.codecs.syntaxes import (
    EXPLICIT_VR_LE,
    HTJ2K_FAMILY,
    HTJ2K_LOSSLESS,
    JPEG2000_FAMILY,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LOSSLESS,
    JPEG_LOSSLESS_SV1,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
)
from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.mediatypes import DICOM, DICOM_JSON, DICOM_XML, JSON, MULTIPART_RELATED, OCTET_STREAM, frame_media_type
from gateway.dicomweb.params import whole_number
from gateway.dicomweb.xml import native_xml
from gateway.model.json import dataset_from_json
from gateway.part10 import file_meta_header, read_file_meta
from gateway.retrieval.listing import count_instances, search_instances
from gateway.retrieval.request import InstanceRef, RetrieveRequest
from gateway.retrieval.source import Fetched, inspect
from gateway.spill import SpillArea
from gateway.spool.record import outward
from gateway.uids import is_valid_uid, json_uid
from gateway.upstream.base import ANY_SYNTAX, Frame, JsonObject, Retrieved
from gateway.upstream.errors import NotFound, NotSupported, UnusableInstance, UpstreamRejected, UpstreamUnavailable
from gateway.upstream.stored_frames import frame_reader, in_batches
from gateway.web.bulk_uris import point_at_facade, pointed_text, with_root
from gateway.web.cache import content_etag, etag_for, not_modified
from gateway.web.compression import body_response, not_modified_headers
from gateway.web.common import (
    MultipartStream,
    NotAcceptable,
    accept_of,
    error_response,
    image_set_id,
    path_uids,
    request_root,
    send_streamed,
    subject,
)
from gateway.web.auth import requester
from gateway.web.video import asks_video, video_of
from gateway.web.keys import AUDIT, CACHE, CONFIG, REFUSED_SERIES, RETRIEVER, UPSTREAM, WHOLE_INSTANCE_FRAMES

log = logging.getLogger("gateway.web")

CHUNK = 1 << 20
ANY = "*"
# The syntax each frame media type defaults to, and the ones it may name (PS3.18 Table 8.7.3-5).
FRAME_DEFAULT = {
    OCTET_STREAM: EXPLICIT_VR_LE,
    "image/jpeg": JPEG_BASELINE,
    "image/jls": JPEG_LS_LOSSLESS,
    "image/jp2": JPEG2000_LOSSLESS,
    "image/jphc": HTJ2K_LOSSLESS,
    "image/dicom-rle": RLE_LOSSLESS,
}
FRAME_SYNTAXES = {
    "image/jpeg": frozenset({JPEG_BASELINE, JPEG_EXTENDED, JPEG_LOSSLESS, JPEG_LOSSLESS_SV1}),
    "image/jls": frozenset({JPEG_LS_LOSSLESS, "1.2.840.10008.1.2.4.81"}),
    "image/jp2": JPEG2000_FAMILY,
    "image/jphc": HTJ2K_FAMILY,
    "image/dicom-rle": frozenset({RLE_LOSSLESS}),
}
PIXEL_TAGS = (0x00280002, 0x00280004, 0x00280006, 0x00280010, 0x00280011, 0x00280100, 0x00280101, 0x00280103, 0x00280008)


# -- negotiation ---------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceForm:
    """How instances go out: one bare part10 body or multipart parts, in a syntax."""

    single: bool
    syntax: str  # a UID, or "*" for as stored


def instance_form(accept: str | None, single_allowed: bool) -> InstanceForm:
    """The first form the Accept header admits (PS3.18 8.7.3.5.2: ELE unless named)."""
    for r in parse_accept(accept):
        ts = r.transfer_syntax or EXPLICIT_VR_LE
        if r.media == MULTIPART_RELATED and r.part_type in ("", DICOM, "*/*", "application/*"):
            return InstanceForm(False, ts)
        if r.media == DICOM and single_allowed:
            return InstanceForm(True, ts)
        if r.media in ("*/*", "application/*", "*"):
            return InstanceForm(False, ts)
    raise NotAcceptable(
        'instances are served as multipart/related; type="application/dicom"'
        + (" or application/dicom" if single_allowed else "")
        + "; transfer-syntax=* or a transfer syntax UID"
    )


def metadata_format(accept: str | None) -> str:
    for r in parse_accept(accept):
        if r.media in (DICOM_JSON, JSON, "*/*", "application/*", "*"):
            return "json"
        if r.media == DICOM_XML or r.media == MULTIPART_RELATED and r.part_type == DICOM_XML:
            return "xml"
    raise NotAcceptable('metadata is served as application/dicom+json or multipart/related; type="application/dicom+xml"')


@dataclass(frozen=True)
class FrameForm:
    """One way to serve frames: the part media type and the syntax (``*``: as stored)."""

    part_type: str
    syntax: str


def frame_forms(accept: str | None) -> list[FrameForm]:
    """Every form the Accept header admits for frames, best first."""
    forms: list[FrameForm] = []
    for r in parse_accept(accept):
        if r.media == MULTIPART_RELATED:
            part = r.part_type or OCTET_STREAM
        elif r.media in ("*/*", "*"):
            part = OCTET_STREAM
        elif r.media in (OCTET_STREAM, *FRAME_SYNTAXES):
            part = r.media  # a single media type: served as one part of it
        else:
            continue
        if part in ("*/*", "application/*", "image/*"):
            forms.append(FrameForm(part, r.transfer_syntax or ANY))
            continue
        if part not in FRAME_DEFAULT:
            continue
        syntax = r.transfer_syntax or FRAME_DEFAULT[part]
        if part != OCTET_STREAM and syntax != ANY and syntax not in FRAME_SYNTAXES.get(part, ()):
            continue
        forms.append(FrameForm(part, syntax))
    return forms


# -- instances -----------------------------------------------------------------------


class InstanceBody:
    """One retrieved instance ready to send: stored bytes, or converted ones, as chunks."""

    def __init__(self, request: web.Request, retrieved: Retrieved, ref: InstanceRef) -> None:
        self.request = request
        self.retrieved = retrieved
        self.ref = ref
        self.syntax = ""
        self.spill: Any = None

    async def prepare(self, target: str) -> None:
        """Read the File Meta and convert when ``target`` differs from the stored syntax.
        (The instance is the one asked for: `fetch_instance` and `_instances` checked.)"""
        head = await asyncio.to_thread(self.retrieved.read, 0, 65536)
        meta = read_file_meta(head)
        self.syntax = meta.transfer_syntax
        self.sop_class = meta.sop_class_uid or self.ref.sop_class_uid
        if target in (ANY, self.syntax):
            self.chunks = self._stored()
            return
        item = Fetched(self.ref, self.retrieved, meta.transfer_syntax, self.sop_class, meta.dataset_offset)
        syntax, data, spill = await self.request.app[RETRIEVER].transcoder.transcoded(item, [target])
        self.syntax, self.spill = syntax, spill
        self.chunks = self._converted(data)

    async def _stored(self) -> AsyncIterator[bytes]:
        r = self.retrieved
        for start in range(0, r.length, CHUNK):
            chunk = r.read(start, CHUNK) if r.data is not None else await asyncio.to_thread(r.read, start, CHUNK)
            # (the embedded archive's files are spool records: their preamble stays here)
            yield outward(chunk) if start == 0 else chunk

    async def _converted(self, data: Any) -> AsyncIterator[bytes]:
        # (a converted data set is the gateway's writing: its File Meta says so)
        yield file_meta_header(self.sop_class, self.ref.sop_instance_uid, self.syntax, "")
        if isinstance(data, (bytes, memoryview)):
            yield bytes(data)
            return
        with open(data.path, "rb") as fh:
            fh.seek(data.offset)
            left = data.length
            while left > 0:
                chunk = await asyncio.to_thread(fh.read, min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk

    def release(self) -> None:
        self.retrieved.release()
        if self.spill is not None:
            self.spill.unlink(missing_ok=True)


def audit_sent(request: web.Request, tally: StudyTally, done: int, failed: int, what: str) -> None:
    """Instances sent to a facade client, told to the audit trail."""
    client = requester(request)
    request.app[AUDIT].sent(client, client, tally, done, failed, what)


async def fetch_instance(request: web.Request, ref: InstanceRef) -> Retrieved:
    """The instance ``ref`` names, checked as a C-MOVE's are (`inspect`): the archive's
    answer must be that instance, whole, of that study and series; UnusableInstance
    otherwise."""
    retriever = request.app[RETRIEVER]
    retrieved = await request.app[UPSTREAM].retrieve_instance(
        ref.study_uid, ref.series_uid, ref.sop_instance_uid, retriever.spill_area, retriever.spill_bytes,
        acceptable=ANY_SYNTAX, image_set_id=image_set_id(request),
    )
    try:
        await inspect(retrieved, ref.study_uid, ref.series_uid, ref.sop_instance_uid)
    except (ValueError, OSError) as exc:
        retrieved.release()
        raise UnusableInstance(f"the archive's answer for instance {ref.sop_instance_uid} is unusable: {exc}") from None
    return retrieved


async def retrieve_instance(request: web.Request) -> web.StreamResponse:
    uids = path_uids(request)
    what = subject("WADO-RS instance", request)
    ref = InstanceRef(uids["study"], uids["series"], uids["instance"], "")
    try:
        form = instance_form(accept_of(request), single_allowed=True)
        body = InstanceBody(request, await fetch_instance(request, ref), ref)
    except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer
        return error_response(exc, what)
    try:
        try:
            await body.prepare(form.syntax)
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, what)
        content_type = f"{DICOM}; transfer-syntax={body.syntax}"
        if form.single:
            answer = await send_streamed(request, web.StreamResponse(headers={"Content-Type": content_type}), body.chunks)
        else:
            stream = MultipartStream(request, DICOM)
            await stream.part(content_type)
            async for chunk in body.chunks:
                await stream.write(chunk)
            answer = await stream.finish()
        audit_sent(request, tally_of([(ref.study_uid, ref.sop_class_uid)]), 1, 0, what)
        return answer
    finally:
        body.release()


async def _instances(request: web.Request, study: str, series: str | None) -> AsyncGenerator[tuple[Retrieved, InstanceRef], None]:
    """Every instance of the study or series, each as soon as it has arrived; those of
    the named image set (HealthImaging) as its metadata lists them."""
    upstream = request.app[UPSTREAM]
    retriever = request.app[RETRIEVER]
    caps = upstream.capabilities
    seen: set[str] = set()
    if image_set_id(request):
        for obj in await metadata_of(request, study, series, None):
            series_uid, sop, sop_class = (json_uid(obj, tag) or "" for tag in ("0020000E", "00080018", "00080016"))
            ref = InstanceRef(study, series_uid, sop, sop_class)
            if not (is_valid_uid(ref.series_uid) and is_valid_uid(ref.sop_instance_uid)):
                continue
            try:
                yield await fetch_instance(request, ref), ref
            except NotFound:
                continue  # deleted since it was listed
            except UnusableInstance as exc:
                log.warning("%s", exc)
        return
    if caps.series_retrieve if series else caps.study_retrieve:
        try:
            async for retrieved in upstream.iter_instances(study, series, retriever.spill_area, retriever.spill_bytes):
                try:  # cut off, malformed or of another study or series: not sent (`inspect`)
                    meta = await inspect(retrieved, study, series or "")
                except (ValueError, OSError) as exc:
                    log.warning("%s of study %s: an instance of the archive's answer not sent: %s", "series" if series else "study", study, exc)
                    retrieved.release()
                    continue
                seen.add(meta.sop_instance_uid)
                ref = InstanceRef(study, series or "", meta.sop_instance_uid, meta.sop_class_uid)
                yield retrieved, ref
        except NotSupported:
            if seen:
                raise
            log.info("the archive refused the %s retrieve; fetching instance by instance", "series" if series else "study")
        else:
            # The answer may lack instances an archive could not send whole; the count
            # says so at the cost of one short search, the listing only then.
            counted = await count_instances(upstream, study, series)
            if counted is not None and counted <= len(seen):
                return
    request_ = RetrieveRequest("SERIES" if series else "STUDY", study_uids=(study,), series_uids=(series,) if series else ())
    async for ref in search_instances(upstream, request_):
        if ref.sop_instance_uid in seen:
            continue
        seen.add(ref.sop_instance_uid)
        try:
            yield await fetch_instance(request, ref), ref
        except NotFound:
            continue  # deleted since it was listed
        except UnusableInstance as exc:
            log.warning("%s", exc)


async def retrieve_bulk(request: web.Request) -> web.StreamResponse:
    """A study or series as one multipart answer, streamed instance by instance.

    An instance that cannot be converted to the syntax asked for is left out, with a
    warning naming it, and the others are sent: converting is deterministic, so
    ending the answer there (the only other signal once the headers are out) would
    make the whole series unreadable in that syntax for good, while checking every
    instance before the first byte would hold a large series' answer back until all
    of it was converted. When instances were left out before the answer began, its
    ``Warning`` header says so; all left out is a 406."""
    uids = path_uids(request)
    series = uids.get("series")
    what = subject(f"WADO-RS {'series' if series else 'study'}", request)
    started = time.monotonic()
    stream: MultipartStream | None = None
    sent = 0
    left_out: list[str] = []
    tally = StudyTally()
    try:
        form = instance_form(accept_of(request), single_allowed=False)
        async with contextlib.aclosing(_instances(request, uids["study"], series)) as instances:
            async for retrieved, ref in instances:
                body = InstanceBody(request, retrieved, ref)
                try:
                    try:
                        await body.prepare(form.syntax)
                    except TranscodeError as exc:
                        left_out.append(ref.sop_instance_uid)
                        log.warning("%s: instance %s left out: cannot convert it to %s: %s", what, ref.sop_instance_uid, form.syntax, exc)
                        continue
                    if stream is None:
                        stream = MultipartStream(request, DICOM)
                        if left_out:
                            stream.response.headers["Warning"] = (
                                f'299 dicom-gateway "{len(left_out)} instance(s) could not be converted to {form.syntax} and are left out"'
                            )
                    await stream.part(f"{DICOM}; transfer-syntax={body.syntax}")
                    async for chunk in body.chunks:
                        await stream.write(chunk)
                    sent += 1
                    tally.add(ref.study_uid, ref.sop_class_uid)
                finally:
                    body.release()
                if stream is not None and stream.head:
                    break  # the headers are out: nothing more to send
    except (ConnectionResetError, asyncio.CancelledError):
        log.info("%s: client went away after %d instances", what, sent)
        audit_sent(request, tally, sent, 1, f"{what}: client went away")
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer, or ends the stream
        if stream is None:
            return error_response(exc, what)
        # Headers are gone: the only honest signal left is an unterminated body.
        log.error("%s: failed after %d instances: %s", what, sent, exc)
        audit_sent(request, tally, sent, 1, f"{what}: failed")
        if request.transport is not None:
            request.transport.close()
        return stream.response
    if stream is None:
        if left_out:
            return error_response(TranscodeError(f"none of the {len(left_out)} instance(s) converts to {form.syntax}"), what)
        return error_response(NotFound("no instances"), what)
    if left_out:
        log.warning("%s: %d instances sent, %d left out (not convertible to %s)", what, sent, len(left_out), form.syntax)
    else:
        log.info("%s: %d instances, %.3f s", what, sent, time.monotonic() - started)
    audit_sent(request, tally, sent, len(left_out), what)
    return await stream.finish()


# -- metadata ------------------------------------------------------------------------


async def metadata_of(
    request: web.Request, study: str, series: str | None, sop: str | None, via_series: bool = True
) -> list[JsonObject]:
    """The upstream's metadata at the level the UIDs name, through the facade's cache
    when the upstream is remote. An instance's comes out of its series' (see
    `FacadeCache.instance_metadata`) unless ``via_series`` is False: a client asking
    one instance's metadata alone does not make the archive read the whole series'."""
    upstream = request.app[UPSTREAM]
    cache = request.app[CACHE]
    named = image_set_id(request)
    if cache is None:
        return list(await upstream.retrieve_metadata(study, series, sop, image_set_id=named))
    if series is not None and sop is not None and via_series:
        return await cache.instance_metadata(
            study, series, sop,
            lambda: upstream.retrieve_metadata(study, series, None, image_set_id=named),
            lambda: upstream.retrieve_metadata(study, series, sop, image_set_id=named),
            named,
        )
    return await cache.metadata(
        study, series, sop, lambda: upstream.retrieve_metadata(study, series, sop, image_set_id=named), named
    )


def _metadata_cache_control(request: web.Request, instance: bool) -> str:
    """An instance's metadata never changes; a study's or series' does as instances
    arrive, so clients revalidate it (the ETag makes that a 304)."""
    if instance:
        return f"private, max-age={request.app[CONFIG].http.cache.client_max_age}"
    return "private, no-cache"


async def _metadata_answer(request: web.Request, fmt: str, uids: dict[str, str]) -> tuple[bytes, list[bytes]]:
    """The metadata the path names, BulkDataURIs pointed at the facade: JSON text, or
    one Native DICOM Model part per instance. JSON kept by the facade's cache is
    served as its text, the request's root put in (`with_root`); so is the embedded
    archive's, each instance's pointed at the facade (`pointed_text`)."""
    study, series, sop = uids["study"], uids.get("series"), uids.get("instance")
    root = request_root(request)
    cache = request.app[CACHE]
    upstream = request.app[UPSTREAM]
    if fmt == "json" and cache is not None:
        named = image_set_id(request)
        fetch = lambda: upstream.retrieve_metadata(study, series, sop, image_set_id=named)  # noqa: E731
        return with_root(await cache.metadata_body(study, series, sop, fetch, named), root), []
    texts = getattr(upstream, "retrieve_metadata_texts", None)
    if fmt == "json" and cache is None and texts is not None:
        kept = await texts(study, series, sop)
        return ("[" + ", ".join(pointed_text(k, root) for k in kept) + "]").encode("utf-8"), []
    objects = [dict(o) for o in await metadata_of(request, study, series, sop, via_series=False)]
    for obj in objects:
        point_at_facade(obj, root, study)
    if fmt == "json":
        return json.dumps(objects, ensure_ascii=False).encode("utf-8"), []
    return b"", [native_xml(obj) for obj in objects]


async def retrieve_metadata(request: web.Request) -> web.StreamResponse:
    uids = path_uids(request)
    what = subject("WADO-RS metadata", request)
    try:
        fmt = metadata_format(accept_of(request))
        body, parts = await _metadata_answer(request, fmt, uids)
    except Exception as exc:  # noqa: BLE001 - RecursionError too: metadata nested too deep to serialise
        request.app[AUDIT].accessed(requester(request), uids["study"], False)
        return error_response(exc, what)
    request.app[AUDIT].accessed(requester(request), uids["study"], True)
    # Validated by content, JSON and XML alike: the XML parts' boundary changes with
    # every answer, so the ETag is of the parts themselves.
    validators = {
        "ETag": content_etag(body if fmt == "json" else b"\0".join([b"xml", *parts])),
        "Cache-Control": _metadata_cache_control(request, "instance" in uids),
        "Vary": "Accept",
    }
    if not_modified(request.headers.get("If-None-Match"), validators["ETag"]):
        return web.Response(status=304, headers=not_modified_headers(request, validators))
    if fmt == "json":
        return await body_response(request, body, DICOM_JSON, validators)
    stream = MultipartStream(request, DICOM_XML)
    stream.response.headers.update(validators)
    for part in parts:
        await stream.part(DICOM_XML, [part])
    return await stream.finish()


# -- frames --------------------------------------------------------------------------


def frame_numbers(text: str) -> list[int]:
    """The frame list of a path: positive and, as PS3.18 asks, none repeated. A list
    repeating one frame made a 4 KB request take 1 GB of the daemon's memory."""
    numbers = []
    for piece in text.split(","):
        number = whole_number(piece)
        if not number:
            raise web.HTTPBadRequest(text="frame numbers are positive integers separated by commas\n")
        numbers.append(number)
    if len(set(numbers)) != len(numbers):
        raise web.HTTPBadRequest(text="a frame number is repeated; each frame is asked once\n")
    return numbers


def pick_form(forms: Sequence[FrameForm], stored: str, desc: PixelDescription) -> FrameForm:
    """The first acceptable form the gateway can produce from ``stored`` frames."""
    for form in forms:
        if form.syntax == ANY or convertible(stored, form.syntax, desc) is None:
            return form
    produce = ["application/octet-stream (transfer-syntax=* or 1.2.840.10008.1.2.1)"]
    for media, default in FRAME_DEFAULT.items():
        if media != OCTET_STREAM and convertible(stored, default, desc) is None:
            produce.append(f"{media} ({default})")
    raise NotAcceptable("frames of this instance can be served as: " + ", ".join(produce))


def refusal(exc: UpstreamUnavailable | NotSupported) -> bool:
    """Whether a failed RetrieveFrames is the archive refusing these frames, which the
    instance retrieved whole makes up for: it cannot serve them (NotSupported), or it
    answered 500 (Orthanc 1.10 for some stored syntaxes). A timeout, an archive out of
    reach, 429 or 502-504 are passing: the client is told (503) and asks again, and the
    series is not switched to whole instances (over HealthImaging a far smaller quota)."""
    return isinstance(exc, NotSupported) or exc.status == 500


async def stored_frames(request: web.Request, ref: InstanceRef, numbers: list[int]) -> AsyncGenerator[Frame, None]:
    """The frames as the archive stores them: by RetrieveFrames, or, when the archive
    fails that (Orthanc 1.10 answers 500 for some stored syntaxes; see `RefusedSeries`)
    or serves no frames, cut out of the instance retrieved whole (with all its other
    frames, into the cache: `WholeInstanceFrames`); of an instance too large for that,
    asked by RetrieveFrames as ELE (see `WholeInstanceFrames.ask_as_ele`)."""
    upstream = request.app[UPSTREAM]
    refusals = request.app[REFUSED_SERIES]
    named = image_set_id(request)
    series_key = f"{ref.study_uid}/{ref.series_uid}@{named or ''}"
    refused: list[Exception] = []
    if upstream.capabilities.frames and not refusals.refused(series_key):
        async for frame in _retrieve_frames(request, ref, numbers, ANY_SYNTAX, refused):
            yield frame
        if not refused:
            return
        refusals.remember(series_key)
        log.info(
            "frames of series %s: the archive failed RetrieveFrames (%s); cutting them from the instances for %.0f s",
            ref.series_uid, refused[0], refusals.seconds,
        )
    frames: list[Frame] | None = None
    whole = request.app[WHOLE_INSTANCE_FRAMES]
    if whole is not None and upstream.capabilities.frames and whole.ask_as_ele(ref, named):
        refused_as_ele: list[Exception] = []
        async for frame in _retrieve_frames(request, ref, numbers, (EXPLICIT_VR_LE,), refused_as_ele):
            yield frame
        if not refused_as_ele:
            return
        whole.ele_refused(ref, named)
    elif whole is not None:
        frames = await whole.frames(ref, numbers, named, lambda: fetch_instance(request, ref))
    if frames is not None:
        for frame in frames:
            yield frame
        return
    retrieved = await fetch_instance(request, ref)
    area = request.app[RETRIEVER].spill_area
    spill = area.new_file(".frames")
    try:
        async for frame in in_batches(partial(_cut_frames, retrieved, area, spill, numbers)):
            yield frame
    finally:
        retrieved.release()
        spill.unlink(missing_ok=True)


async def _retrieve_frames(
    request: web.Request, ref: InstanceRef, numbers: list[int], acceptable: Sequence[str], refused: list[Exception]
) -> AsyncIterator[Frame]:
    """RetrieveFrames in one of the ``acceptable`` syntaxes. Refused before any frame
    came (`refusal`), it ends with no frame and the refusal appended to ``refused``;
    other failures are raised."""
    given = 0
    try:
        async for frame in request.app[UPSTREAM].retrieve_frames(
            ref.study_uid, ref.series_uid, ref.sop_instance_uid, numbers, acceptable=acceptable,
            image_set_id=image_set_id(request),
        ):
            given += 1
            yield frame
    except (UpstreamUnavailable, NotSupported) as exc:
        if given or not refusal(exc):
            raise
        refused.append(exc)


def _cut_frames(retrieved: Retrieved, area: SpillArea, spill: Path, numbers: list[int]) -> Iterator[Frame]:
    """The frames ``numbers`` of a retrieved instance as stored, as they are read
    (blocking): parsed in memory when the instance came into memory, else from a copy
    of it at ``spill`` (in ``area``), made here."""
    stored = read_file_meta(retrieved.read(0, 65536)).transfer_syntax
    if retrieved.data is not None:
        return frame_reader(retrieved.read(), stored, numbers, ANY_SYNTAX)
    _materialise(retrieved, area, spill)
    return frame_reader(spill, stored, numbers, ANY_SYNTAX)


def _materialise(retrieved: Retrieved, area: SpillArea, path: Path) -> None:
    """Copy a retrieved Part 10 file to ``path`` in bounded chunks (blocking), if the
    spill area has room for it (SpillFull otherwise)."""
    area.check(retrieved.length)
    with open(path, "wb") as out:
        for start in range(0, retrieved.length, CHUNK):
            out.write(retrieved.read(start, CHUNK))


def frames_of(request: web.Request, ref: InstanceRef, numbers: list[int]) -> AsyncGenerator[Frame, None]:
    """The frames as stored, through the facade's cache when the upstream is remote."""
    cache = request.app[CACHE]
    if cache is None:
        return stored_frames(request, ref, numbers)
    return cache.frames(
        ref.study_uid, ref.series_uid, ref.sop_instance_uid, numbers, lambda run: stored_frames(request, ref, run),
        image_set_id(request),
    )


async def pixels_of(
    request: web.Request, study: str, series: str, sop: str, generation: int | None
) -> tuple[PixelDescription, int]:
    """An instance's pixel description and number of frames, from its metadata (kept
    parsed by the facade's cache while the metadata is cached: `FacadeCache.derived`)."""
    cache = request.app[CACHE]
    image_set = image_set_id(request)
    if cache is not None and (kept := cache.derived(study, series, sop, image_set, "pixels")) is not None:
        return kept
    metadata = await metadata_of(request, study, series, sop)
    if not metadata:
        raise NotFound("no such instance")
    ds = dataset_from_json(metadata[0], PIXEL_TAGS)
    try:
        desc = PixelDescription.from_dataset(ds)
    except (TranscodeError, ValueError, AttributeError, TypeError):
        raise NotFound("the instance has no usable pixel description") from None
    pixels = desc, int(ds.get("NumberOfFrames") or 1)
    if cache is not None:
        cache.remember(study, series, sop, image_set, "pixels", pixels, generation)
    return pixels


# Frames of one request read from the cache at once when all were converted before.
KEPT_CONVERTED_AT_ONCE = 16


async def _frame_answers(
    request: web.Request,
    ref: InstanceRef,
    numbers: list[int],
    forms: Sequence[FrameForm],
    desc: PixelDescription,
    generation: int | None,
) -> AsyncGenerator[tuple[FrameForm, str, Callable[[], Awaitable[bytes]]], None]:
    """For each frame asked, in order: the form and syntax it is answered in, and how
    to have its bytes (awaited only after the If-None-Match check, so a 304 converts
    nothing).

    Frames the cache holds converted to the first form asked are answered from there
    without reading the frames as stored: that form is the one `pick_form` would
    choose, since the stored frames were converted to it once."""
    cache = request.app[CACHE]
    image_set = image_set_id(request)
    study, series, sop = ref.study_uid, ref.series_uid, ref.sop_instance_uid
    first = forms[0]
    if cache is not None and first.syntax != ANY and len(numbers) <= KEPT_CONVERTED_AT_ONCE:
        kept = await cache.kept_converted(study, series, sop, numbers, image_set, first.syntax)
        if kept is not None:
            for data in kept:
                yield first, first.syntax, partial(_ready, data)
            return
    codecs = request.app[RETRIEVER].codecs
    loop = asyncio.get_running_loop()
    form: FrameForm | None = None
    async with contextlib.aclosing(frames_of(request, ref, numbers)) as frames:
        async for frame in frames:
            source = actual_syntax(frame.data, frame.transfer_syntax, desc)
            if form is None:
                form = pick_form(forms, source, desc)
            target = source if form.syntax == ANY else form.syntax
            convert = partial(loop.run_in_executor, codecs, convert_frame, frame.data, source, target, desc)
            if same_bytes(source, target):
                yield form, target, partial(_ready, frame.data)  # as asked already: no trip to a codec thread
            elif cache is None:
                yield form, target, convert
            else:
                yield form, target, partial(
                    cache.converted, study, series, sop, frame.number, image_set, target, generation, convert
                )


async def _ready(data: bytes) -> bytes:
    return data


async def retrieve_frames(request: web.Request) -> web.StreamResponse:
    uids = path_uids(request)
    what = subject("WADO-RS frames", request)
    numbers = frame_numbers(request.match_info["frames"])
    study, series, sop = uids["study"], uids["series"], uids["instance"]
    named = [image_set] if (image_set := image_set_id(request)) else []  # a named image set's frames validate apart
    cache = request.app[CACHE]
    generation = cache.generation(study) if cache is not None else None  # before any frame is read
    stream: MultipartStream | None = None
    try:
        forms = frame_forms(accept_of(request))
        if not forms:
            raise NotAcceptable(
                'frames are served as multipart/related; type="application/octet-stream" (or image/jphc, image/jpeg, '
                "image/jls, image/jp2, image/dicom-rle) with an optional transfer-syntax"
            )
        desc, count = await pixels_of(request, study, series, sop, generation)
        if any(n > count for n in numbers):
            raise UpstreamRejected(f"the instance has {count} frame(s)", 400)
        answers = _frame_answers(request, InstanceRef(study, series, sop, ""), numbers, forms, desc, generation)
        async with contextlib.aclosing(answers):
            async for form, target, produce in answers:
                media = form.part_type if form.part_type not in ("*/*", "application/*", "image/*") else frame_media_type(target)
                validators = {
                    "ETag": etag_for(sop, numbers, media, target, *named),
                    "Cache-Control": f"private, max-age={request.app[CONFIG].http.cache.client_max_age}",
                    "Vary": "Accept",  # the same URL has a representation per media type and syntax
                }
                if stream is None and not_modified(request.headers.get("If-None-Match"), validators["ETag"]):
                    return web.Response(status=304, headers=validators)
                data = await produce()
                if stream is None:
                    stream = MultipartStream(request, media, f"; transfer-syntax={target}")
                    stream.response.headers.update(validators)
                await stream.part(f"{media}; transfer-syntax={target}", [data])
                if stream.head:
                    break
    except ConnectionResetError:
        raise  # the client closed the connection: `gateway.web.client_gone`
    except Exception as exc:  # noqa: BLE001
        if stream is None:
            return error_response(exc, what)
        log.error("%s: failed after the answer began: %s", what, exc)
        if request.transport is not None:
            request.transport.close()
        return stream.response
    if stream is None:
        return error_response(NotFound("no frames"), what)
    return await stream.finish()


def bulk_value(path: Path, tag_path: str) -> bytes:
    """The value of the element ``tag_path`` names (``7FE00010``, or
    ``00540016/0/00181072`` through sequence items) in the Part 10 file (blocking)."""
    pieces = tag_path.strip("/").split("/")
    if len(pieces) % 2 == 0:
        raise UpstreamRejected("a bulk data path alternates tags and item numbers, ending with a tag", 400)
    ds = pydicom.dcmread(path, defer_size=1024)
    try:
        for i in range(0, len(pieces) - 1, 2):
            ds = ds[int(pieces[i], 16)].value[int(pieces[i + 1])]
        element = ds[int(pieces[-1], 16)]
    except (KeyError, IndexError, ValueError, TypeError):
        raise NotFound("no such bulk data") from None
    value = element.value
    if not isinstance(value, (bytes, bytearray)):
        raise NotFound("no bulk data there")
    return bytes(value)


async def retrieve_bulkdata(request: web.Request) -> web.StreamResponse:
    """A BulkDataURI of the metadata: the element's value as one octet-stream part."""
    uids = path_uids(request)
    what = subject("WADO-RS bulkdata", request)
    ref = InstanceRef(uids["study"], uids["series"], uids["instance"], "")
    if request.match_info["tags"].strip("/").upper() == "7FE00010" and asks_video(accept_of(request), {}):
        # a video's Pixel Data asked as video (OHIF: ?accept=video/mp4), served as /rendered serves it
        try:
            video = await video_of(request, ref, lambda: fetch_instance(request, ref), accept_of(request))
        except web.HTTPException:  # 416: a range past the end
            raise
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, what)
        if video is not None:
            return video
    area = request.app[RETRIEVER].spill_area
    spill = area.new_file(".bulk")
    try:
        retrieved = await fetch_instance(request, ref)
        try:
            await asyncio.to_thread(_materialise, retrieved, area, spill)
        finally:
            retrieved.release()
        value = await asyncio.to_thread(bulk_value, spill, request.match_info["tags"])
    except Exception as exc:  # noqa: BLE001
        return error_response(exc, what)
    finally:
        spill.unlink(missing_ok=True)
    stream = MultipartStream(request, OCTET_STREAM)
    await stream.part(OCTET_STREAM, [value])
    return await stream.finish()


def add_routes(router: Any, prefix: str) -> None:
    """The WADO-RS resources under ``prefix`` (a DICOMweb root)."""
    study = f"{prefix}/studies/{{study}}"
    series = f"{study}/series/{{series}}"
    instance = f"{series}/instances/{{instance}}"
    router.add("GET", study, retrieve_bulk)
    router.add("GET", series, retrieve_bulk)
    router.add("GET", instance, retrieve_instance)
    for path in (study, series, instance):
        router.add("GET", f"{path}/metadata", retrieve_metadata)
    router.add("GET", f"{instance}/frames/{{frames}}", retrieve_frames)
    router.add("GET", f"{instance}/bulkdata/{{tags:.+}}", retrieve_bulkdata)
