"""STOW-RS (PS3.18 10.5): uploads enter the spool like C-STOREs, with the same guarantee.

The body is parsed while it streams in: a part up to 4 MiB is written into a spool
record as a C-STORE is (after its preamble: the record's own takes its place), a
larger one goes straight to a file in the spool's ``incoming/`` as it arrives; either
is handed to the one ingest function, which checks its header and makes it durable. The answer is sent
only once every accepted instance is fsynced, as a C-STORE Success is. A part that is
unreadable, lacks a UID, or belongs to another study than the path names fails on its
own (PS3.18 failure reasons 0xC000, 0xA900); the others are stored.

Accepted bodies: ``multipart/related; type="application/dicom"`` (also what ``curl
--form`` sends with the Content-Type overridden, parts carrying form-data headers), a
single ``application/dicom`` body (Azure's and HealthImaging's single-part form), and
``multipart/related; type="application/dicom+json"`` (or ``+xml``, PS3.19 documents):
metadata with bulk data parts, each instance built into a Part 10 file
(`gateway.dicomweb.stow_metadata`) and then ingested like the others.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gateway.audit.auditor import tally_of
from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.mediatypes import DICOM, DICOM_JSON, DICOM_XML, JSON, MULTIPART_RELATED, OCTET_STREAM, media_type
from gateway.dicomweb.multipart_reader import MultipartError, StreamedPart, boundary_of, iter_parts
from gateway.dicomweb.stow_metadata import BulkPart, NotBuilt, build_instance, metadata_objects
from gateway.dicomweb.xml import json_from_native_xml, native_xml
from gateway.spill import SpillArea
from gateway.spool.ingest import Ingested, Verdict, ingest
from gateway.spool.queue import SPACE_CHECK_BYTES, SpoolFull
from gateway.spool.receipt import Receipt
from gateway.spool.record import PREAMBLE, Sender
from gateway.web.common import accept_of, path_uids, request_root, text_error
from gateway.web.expect import send_continue
from gateway.web.auth import requester
from gateway.web.keys import AUDIT, CACHE, CONFIG, SPOOL

log = logging.getLogger("gateway.web")

# Parts up to this size are gathered in memory, larger ones are written as they arrive.
SPILL_BYTES = 4 << 20
# Bulk data parts are all held until the body ends: only small ones in memory.
METADATA_SPILL_BYTES = 256 << 10
# Metadata is parsed whole: this much in one request is not metadata (it would be
# thousands of instances' worth), and parsing more could take the daemon's memory.
METADATA_MAX_BYTES = 64 << 20
# Small bulk data parts held in memory until the body ends, at most this much in all.
BULK_MEMORY_BYTES = 32 << 20
METADATA_TYPES = (DICOM_JSON, JSON, DICOM_XML)
READ_CHUNK = 1 << 18
RETRY_AFTER_SECONDS = 60

PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
# PS3.18 Table 10.5.3-2 / PS3.4 B.2.3 for each ingest verdict that stores nothing.
FAILURE_REASON = {
    Verdict.UNREADABLE: CANNOT_UNDERSTAND,
    Verdict.MISMATCH: DATA_SET_MISMATCH,
    Verdict.NO_SPACE: OUT_OF_RESOURCES,
}


@dataclass(frozen=True)
class PartResult:
    """What became of one part: stored (reason 0) or failed with a PS3.18 reason."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    reason: int = 0
    comment: str = ""


def _take(spool: Any, part: StreamedPart, source: str, study_uid: str | None) -> PartResult:
    """Ingest one received part, checked against the path's study (blocking)."""
    if part.path is not None:
        return _ingest(spool, part.path, source, study_uid)
    data = memoryview(part.data or b"")
    # A Part 10 file's preamble is the sender's; the record's replaces it. A part too
    # short for one is refused by the header check, as it would be.
    return _received(spool, lambda write: write(data[PREAMBLE:]), source, study_uid)


def _take_built(spool: Any, metadata: dict[str, Any], bulk: dict[str, BulkPart], source: str, study_uid: str | None) -> PartResult:
    """Build the instance one metadata object describes and ingest it (blocking)."""
    try:
        built = build_instance(metadata, bulk)
    except NotBuilt as exc:
        log.debug("instance %s from %s not built: %s", exc.uids[1][:64] or "?", source, exc)
        return PartResult(*exc.uids, exc.reason, str(exc))
    except Exception:  # noqa: BLE001 - one instance's surprise must not fail the others' answer
        log.exception("an instance from %s could not be built", source)
        return PartResult("", "", "", "", PROCESSING_FAILURE, "instance could not be built")
    return _received(spool, built.write, source, study_uid)


def _received(spool: Any, fill: Callable[[Callable[[bytes | memoryview], None]], None], source: str, study_uid: str | None) -> PartResult:
    """A new spool record, filled by ``fill`` (given the record's write), then ingested."""
    try:
        received = spool.receive()
    except OSError as exc:
        log.error("a part from %s not stored: %s", source, exc.strerror or exc)
        return PartResult("", "", "", "", OUT_OF_RESOURCES, "spool unusable")
    try:
        fill(received.write)
    except OSError as exc:
        received.abandon()
        log.error("a part from %s not stored: %s", source, exc.strerror or exc)
        return PartResult("", "", "", "", OUT_OF_RESOURCES, "spool write failed")
    except BaseException:
        received.abandon()
        raise
    return _ingest(spool, received, source, study_uid)


def _ingest(spool: Any, received: Receipt | Path, source: str, study_uid: str | None) -> PartResult:
    """The one ingest function on a received instance; what it refuses is dropped."""
    try:
        result: Ingested = ingest(spool, received, Sender(source), expected_study=study_uid, refusal_level=logging.DEBUG)
        h = result.header
        ids = (h.sop_class_uid, h.sop_instance_uid, h.study_uid, h.series_uid) if h else ("", "", "", "")
        if result.verdict in (Verdict.STORED, Verdict.DELIVERED):
            return PartResult(*ids)
        return PartResult(*ids, FAILURE_REASON.get(result.verdict, PROCESSING_FAILURE), result.reason)
    finally:
        # Consumed by ingest when stored; a refused one goes.
        if isinstance(received, Receipt):
            received.abandon()
        else:
            received.unlink(missing_ok=True)


class BodyStalled(TimeoutError):
    """The client sent no byte of the body for ``http.idle_timeout`` seconds."""


class SpoolFullMidBody(Exception):
    """The spool reached a disk limit while the body arrived (or its disk filled)."""


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, each wait for more bounded by
    ``http.idle_timeout``. A client that stops sending mid-body would otherwise hold
    its request, and the spool files of its parts, for as long as it keeps the
    connection open; so would a malformed chunk, after which aiohttp delivers nothing
    more of the body and answers the error only once this request is answered.

    The spool's disk limits are checked again every `SPACE_CHECK_BYTES`, as during a
    C-STORE: a 100 MB body on a disk with less free had filled it to the last block
    (every C-STORE arriving meanwhile refused) and was answered 400."""
    idle = request.app[CONFIG].http.idle_timeout
    spool = request.app[SPOOL]
    unchecked = 0
    await send_continue(request)
    while True:
        try:
            async with asyncio.timeout(idle):
                chunk = await request.content.read(READ_CHUNK)
        except TimeoutError:
            raise BodyStalled(f"no body data for {idle:g} s") from None
        if not chunk:
            return
        unchecked += len(chunk)
        if unchecked >= SPACE_CHECK_BYTES:
            unchecked = 0
            try:
                problem = await asyncio.to_thread(spool.space_problem)
            except OSError as exc:
                problem = f"spool unusable: {exc.strerror}"
            if problem is not None:
                raise SpoolFullMidBody(problem)
        yield chunk


async def _parts(request: web.Request, incoming: Path) -> AsyncIterator[StreamedPart]:
    """The body's instances as they complete (one part for a single-part body)."""
    content_type = request.headers.get("Content-Type", "")
    media = media_type(content_type)
    if media in (DICOM, OCTET_STREAM):
        path = incoming / f"{uuid.uuid4().hex}.part"
        length = 0
        try:
            with open(path, "wb") as fh:
                async for chunk in _body(request):
                    await asyncio.to_thread(fh.write, chunk)
                    length += len(chunk)
        except BaseException:
            path.unlink(missing_ok=True)  # a body cut off is nobody's instance
            raise
        yield StreamedPart({"content-type": DICOM}, None, path, length)
        return
    async for part in iter_parts(_body(request), boundary_of(content_type), _parts_area(incoming), SPILL_BYTES):
        yield part


def _parts_area(incoming: Path) -> SpillArea:
    """Where large parts of a body wait while they arrive: the spool's incoming
    directory, with no floor of its own (`_body` holds the body to the spool's limits
    as it arrives, as a C-STORE is held)."""
    return SpillArea(incoming)


def _part_type(content_type: str) -> str:
    """The ``type`` parameter of a multipart Content-Type (application/dicom if none)."""
    return next((r.part_type for r in parse_accept(content_type) if r.part_type), DICOM)


def _check_type(request: web.Request) -> str | None:
    """Why the request's Content-Type is not one STOW-RS takes, or None."""
    content_type = request.headers.get("Content-Type", "")
    media = media_type(content_type)
    if media in (DICOM, OCTET_STREAM):
        return None
    if media not in (MULTIPART_RELATED, "multipart/form-data"):
        return f"Content-Type {media or '(none)'} is not multipart/related or application/dicom"
    part_type = _part_type(content_type)
    if part_type not in (DICOM, DICOM_JSON, DICOM_XML):
        return f"STOW-RS takes application/dicom parts, or application/dicom+json or +xml metadata, not {part_type}"
    try:
        boundary_of(content_type)
    except MultipartError:
        return "multipart Content-Type without a boundary"
    return None


async def _gather_instances(request: web.Request, spool: Any, source: str, study_uid: str | None, results: list[PartResult]) -> None:
    """Part 10 parts: each ingested as soon as it is complete."""
    async for part in _parts(request, spool.incoming):
        part_type = media_type(part.headers.get("content-type", DICOM))
        if part_type not in (DICOM, OCTET_STREAM):
            if part.path is not None:
                part.path.unlink(missing_ok=True)
            results.append(PartResult("", "", "", "", CANNOT_UNDERSTAND, f"part of type {part_type}"))
            continue
        results.append(await asyncio.to_thread(_take, spool, part, source, study_uid))


def _spill(directory: Path, data: bytes) -> Path:
    """A bulk data part moved from memory to a file of its own."""
    path = directory / f"{uuid.uuid4().hex}.part"
    path.write_bytes(data)
    return path


def _metadata_of(kind: str, part: StreamedPart) -> list[dict[str, Any]]:
    """The instances one metadata part describes (blocking: it may be in a spill file)."""
    data = part.data if part.data is not None else part.path.read_bytes()  # type: ignore[union-attr]
    return [json_from_native_xml(data)] if kind == DICOM_XML else metadata_objects(data)


async def _gather_metadata(request: web.Request, spool: Any, source: str, study_uid: str | None, results: list[PartResult]) -> None:
    """Metadata (DICOM JSON, or PS3.19 XML read into it) and bulk data: the whole body
    is read first (a BulkDataURI may name a part that comes after its metadata), bulk
    parts above METADATA_SPILL_BYTES kept in spill files; then each instance is built
    and ingested."""
    objects: list[dict[str, Any]] = []
    bulk: dict[str, BulkPart] = {}
    spilled: list[Path] = []
    metadata_bytes = held_bytes = ignored = 0
    try:
        body = iter_parts(
            _body(request), boundary_of(request.headers.get("Content-Type", "")),
            _parts_area(spool.incoming), METADATA_SPILL_BYTES,
        )
        async for part in body:
            if part.path is not None:
                spilled.append(part.path)
            content_type = part.headers.get("content-type", OCTET_STREAM)
            kind = media_type(content_type)
            # Each refused part is a DEBUG line: the request's one summary line counts them
            # (a body of 100,000 one-byte parts is one request).
            if kind in METADATA_TYPES and metadata_bytes + part.length > METADATA_MAX_BYTES:
                log.debug("%s: a metadata part of %d bytes refused (over %d in all)", source, part.length, METADATA_MAX_BYTES)
                results.append(PartResult("", "", "", "", CANNOT_UNDERSTAND, "metadata too large"))
            elif kind in METADATA_TYPES:
                metadata_bytes += part.length
                try:
                    objects.extend(await asyncio.to_thread(_metadata_of, kind, part))
                except ValueError as exc:
                    log.debug("%s: metadata part unreadable: %s", source, str(exc)[:200])
                    results.append(PartResult("", "", "", "", CANNOT_UNDERSTAND, "metadata part unreadable"))
            elif location := part.headers.get("content-location"):
                data, path = part.data, part.path
                if data is not None:
                    held_bytes += len(data)
                    if held_bytes > BULK_MEMORY_BYTES:  # enough held in memory: the rest waits on disk
                        path, data = await asyncio.to_thread(_spill, spool.incoming, data), None
                        spilled.append(path)
                bulk[location.strip()] = BulkPart.of(content_type, data, path, part.length)
            else:
                ignored += 1
        if ignored:
            log.warning("%s: %d bulk data part(s) without Content-Location ignored", source, ignored)
        for metadata in objects:
            results.append(await asyncio.to_thread(_take_built, spool, metadata, bulk, source, study_uid))
    finally:
        for path in spilled:
            path.unlink(missing_ok=True)


async def _answer_and_close(request: web.Request, answer: web.Response) -> web.Response:
    """Send ``answer``, then close the connection: aiohttp would otherwise wait up to
    10 s more for the rest of a body that is not coming before it closes."""
    answer.force_close()
    await answer.prepare(request)
    await answer.write_eof()
    request.protocol.force_close()
    return answer


def response_module(results: list[PartResult], root: str, study_uid: str | None) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) as DICOM JSON."""
    stored = [r for r in results if not r.reason]
    failed = [r for r in results if r.reason]
    module: dict[str, Any] = {}
    if study_uid is not None or stored:
        study = study_uid or stored[0].study_uid
        module["00081190"] = {"vr": "UR", "Value": [f"{root}/studies/{study}"]}
    if stored:
        module["00081199"] = {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [r.sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [r.sop_instance_uid]},
                    "00081190": {
                        "vr": "UR",
                        "Value": [f"{root}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_instance_uid}"],
                    },
                }
                for r in stored
            ],
        }
    if failed:
        items = []
        for r in failed:
            item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [r.reason]}}
            if r.sop_instance_uid:
                item["00081150"] = {"vr": "UI", "Value": [r.sop_class_uid]}
                item["00081155"] = {"vr": "UI", "Value": [r.sop_instance_uid]}
            items.append(item)
        module["00081198"] = {"vr": "SQ", "Value": items}
    return module


def _audit(request: web.Request, results: list[PartResult], description: str) -> None:
    stored = [r for r in results if not r.reason]
    request.app[AUDIT].received(
        requester(request), tally_of((r.study_uid, r.sop_class_uid) for r in stored),
        len(stored), len(results) - len(stored), description,
    )


async def store(request: web.Request) -> web.StreamResponse:
    started = time.monotonic()
    study_uid = path_uids(request).get("study")
    spool = request.app[SPOOL]
    source = f"STOW-RS {request.remote}"
    problem = _check_type(request)
    if problem is not None:
        return text_error(415, problem)
    try:
        await asyncio.to_thread(spool.check_space)
    except SpoolFull as exc:
        log.error("STOW-RS from %s refused: %s", request.remote, exc)
        return text_error(503, "the gateway's spool is full; try again later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    results: list[PartResult] = []
    gather = _gather_metadata if _part_type(request.headers.get("Content-Type", "")) in (DICOM_JSON, DICOM_XML) else _gather_instances
    try:
        await gather(request, spool, source, study_uid, results)
    except MultipartError as exc:
        log.warning("STOW-RS from %s: body unreadable after %d parts: %s", request.remote, len(results), exc)
        results.append(PartResult("", "", "", "", CANNOT_UNDERSTAND, f"unreadable multipart body: {exc}"))
    except SpoolFullMidBody as exc:
        return await _spool_full_mid_body(request, results, str(exc))
    except BodyStalled as exc:  # before OSError: TimeoutError is one
        stored = sum(1 for r in results if not r.reason)
        log.warning("STOW-RS from %s: body cut off after %d stored instance(s): %s", request.remote, stored, exc)
        _audit(request, results, "STOW-RS, body stalled")
        return await _answer_and_close(request, text_error(408, f"the request body stalled: {exc}"))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _cut_off(request, results, exc)
        # the disk filled faster than the checks above saw (another writer on it)
        return await _spool_full_mid_body(request, results, f"spool disk full: {exc.strerror}")
    except (aiohttp.ClientError, HttpProcessingError) as exc:
        return _cut_off(request, results, exc)
    if not results:
        return text_error(400, "the request holds no instance")
    stored = sum(1 for r in results if not r.reason)
    if not stored and all(r.reason == OUT_OF_RESOURCES for r in results):
        return text_error(503, "the gateway's spool is full; try again later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    status = 200 if stored == len(results) else 202 if stored else 409
    cache = request.app[CACHE]
    if cache is not None:  # a viewer asking again sees the new instances once they are upstream
        for study in {r.study_uid for r in results if not r.reason}:
            cache.forget_stored(study, [(r.series_uid, r.sop_instance_uid) for r in results if not r.reason and r.study_uid == study])
    log.log(
        logging.WARNING if stored < len(results) else logging.INFO,
        "STOW-RS from %s: %d stored, %d failed%s, %.3f s",
        request.remote, stored, len(results) - stored, _failures(results), time.monotonic() - started,
    )
    _audit(request, results, "STOW-RS")
    module = response_module(results, request_root(request), study_uid)
    if any(media_range.media == DICOM_XML or media_range.part_type == DICOM_XML for media_range in parse_accept(accept_of(request))[:1]):
        return web.Response(status=status, body=native_xml(module), content_type=DICOM_XML)
    return web.Response(status=status, body=json.dumps(module).encode(), content_type=DICOM_JSON)


def _cut_off(request: web.Request, results: list[PartResult], exc: BaseException) -> web.Response:
    """The client went away mid-body: what was complete before is stored (and stays)."""
    stored = sum(1 for r in results if not r.reason)
    log.warning("STOW-RS from %s: body cut off after %d stored instance(s): %s", request.remote, stored, type(exc).__name__)
    _audit(request, results, "STOW-RS, body cut off")
    return text_error(400, "the request body ended early")


async def _spool_full_mid_body(request: web.Request, results: list[PartResult], problem: str) -> web.Response:
    """A disk limit reached while the body arrived: the part in progress is dropped,
    the parts complete before are stored (and stay), the rest is not read; 503 with
    Retry-After, as when the spool is full before the body, so the client sends again."""
    stored = sum(1 for r in results if not r.reason)
    log.error("STOW-RS from %s: body refused after %d stored instance(s): %s", request.remote, stored, problem)
    _audit(request, results, "STOW-RS, spool full")
    return await _answer_and_close(
        request, text_error(503, "the gateway's spool is full; try again later", {"Retry-After": str(RETRY_AFTER_SECONDS)})
    )


def _failures(results: list[PartResult]) -> str:
    """The request's failures in a few words for its one log line: the commonest
    reasons with their counts, and the first instances refused (UIDs, no PHI)."""
    failed = [r for r in results if r.reason]
    if not failed:
        return ""
    reasons = collections.Counter(r.comment for r in failed)
    words = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(3)) + ("; ..." if len(reasons) > 3 else "")
    named = [r.sop_instance_uid for r in failed if r.sop_instance_uid]
    if named:
        words += "; refused: " + ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    return f" ({words})"


def add_routes(router: Any, prefix: str) -> None:
    """STOW-RS (and Azure's PUT upsert, the same here: the archive keeps the last copy)."""
    for method in ("POST", "PUT"):
        router.add(method, f"{prefix}/studies", store)
        router.add(method, f"{prefix}/studies/{{study}}", store)
