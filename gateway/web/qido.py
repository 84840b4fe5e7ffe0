"""QIDO-RS (PS3.18 10.6): searches answered by the upstream, re-checked by the gateway.

Every answer the archive gives is matched again with the keys' PS3.4 rules (the same
`Key` values C-FIND uses), so an archive that ignores or loosens a parameter never
produces a wrong match. ``offset``/``limit`` apply to the re-checked matches; the
answer is capped at ``find.max_matches`` with a PS3.18 Warning header when more exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from gateway.audit.auditor import STUDY_ROOT_FIND, blank_query_string
from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.mediatypes import DICOM_JSON, DICOM_XML, JSON, MULTIPART_RELATED
from gateway.dicomweb.qido_parse import QidoRequest, parse_qido
from gateway.dicomweb.xml import native_xml
from gateway.model.json import dataset_from_json
from gateway.model.query import LEVELS, Model, QueryError, attribute_level, tag_name
from gateway.upstream.base import JsonObject
from gateway.upstream.errors import SearchTruncated
from gateway.web.common import MultipartStream, NotAcceptable, accept_of, error_response, path_uids
from gateway.web.auth import requester
from gateway.web.compression import body_response
from gateway.web.keys import AUDIT, CONFIG, UPSTREAM

log = logging.getLogger("gateway.web")

SEARCH_METHOD = {"STUDY": "search_for_studies", "SERIES": "search_for_series", "IMAGE": "search_for_instances"}
KNOWN_UID_TAGS = {"study": 0x0020000D, "series": 0x0020000E}
XML_TYPES = (DICOM_XML, "text/xml", "application/xml")


def answer_format(accept: str | None) -> str:
    """``json`` or ``xml`` (multipart of PS3.19 documents), from the Accept header."""
    for media_range in parse_accept(accept):
        if media_range.media in (DICOM_JSON, JSON, "*/*", "application/*", "*"):
            return "json"
        if media_range.media in XML_TYPES:
            return "xml"
        if media_range.media == MULTIPART_RELATED and media_range.part_type in XML_TYPES:
            return "xml"
    raise NotAcceptable(
        "QIDO-RS answers application/dicom+json (or application/json) and "
        'multipart/related; type="application/dicom+xml"'
    )


async def matches(request: web.Request, qido: QidoRequest, cap: int) -> tuple[list[JsonObject], str]:
    """The re-checked matches in the client's window, and a Warning (or "")."""
    upstream = request.app[UPSTREAM]
    timeout = request.app[CONFIG].find.timeout + 5
    known = {tag: uid for name, tag in KNOWN_UID_TAGS.items() if (uid := request.match_info.get(name))}
    tags = {k.tag for k in qido.keys}
    wanted = qido.offset + min(qido.limit if qido.limit is not None else cap, cap)
    found: list[JsonObject] = []
    seen: set[str] = set()
    unique = {"STUDY": "0020000D", "SERIES": "0020000E", "IMAGE": "00080018"}[qido.level]
    warning = ""
    method: Callable[..., AsyncIterator[JsonObject]] = getattr(upstream, SEARCH_METHOD[qido.level])
    source = method(qido.search)
    try:
        while True:
            try:
                async with asyncio.timeout(timeout):
                    obj = await anext(source)
            except StopAsyncIteration:
                break
            entity = dataset_from_json(obj, tags)
            for tag, uid in known.items():
                if tag not in entity:
                    entity.add_new(tag, "UI", uid)
            if not qido.matches(entity):
                continue
            uid = str(((obj.get(unique) or {}).get("Value") or [""])[0])
            if uid in seen:
                continue  # the archive repeated a match between pages
            seen.add(uid)
            if len(found) == wanted:
                if qido.limit is None or qido.limit > cap:
                    warning = f'299 dicom-gateway "more than {cap} matches; the answer is cut, refine the query"'
                break
            found.append(reduced(obj, qido))
    except SearchTruncated:
        warning = '299 dicom-gateway "the archive holds more matches than it returned"'
    finally:
        with contextlib.suppress(Exception):
            await source.aclose()  # type: ignore[attr-defined]
    return found[qido.offset :], warning


def reduced(obj: JsonObject, qido: QidoRequest) -> JsonObject:
    """The attributes of the answer's level and above, plus those asked for: an
    archive (the embedded one) may answer a study search with a whole instance's
    header. ``includefield=all`` keeps everything."""
    if qido.search.include_all or qido.level == "IMAGE":
        return obj
    top = LEVELS.index(qido.level)
    asked = {f"{t:08X}" for t in qido.search.include}
    out = {}
    for key, value in obj.items():
        try:
            tag = int(key, 16)
        except ValueError:
            continue
        if key in asked or LEVELS.index(attribute_level(tag, Model.STUDY_ROOT)) <= top or tag == 0x00080005:
            out[key] = value
    return out


def _audit(request: web.Request, ok: bool, description: str) -> None:
    """The search as the audit trail keeps it: its path and its query string with
    only UIDs and paging left in the values."""
    audit = request.app[AUDIT]
    if audit.enabled:
        asked = request.path.encode("ascii", "replace") + b"?" + blank_query_string(request.query_string)
        audit.queried(requester(request), STUDY_ROOT_FIND, asked, ok, description=description)


def _search_handler(resource: str) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        uids = path_uids(request)
        what = f"QIDO-RS {resource}"
        try:
            fmt = answer_format(accept_of(request))
            qido = parse_qido(resource, list(request.query.items()), uids.get("study"), uids.get("series"))
            found, warning = await matches(request, qido, request.app[CONFIG].find.max_matches)
        except Exception as exc:  # noqa: BLE001 - every failure becomes an HTTP answer
            if isinstance(exc, QueryError):
                log.info("%s refused: %s", what, exc)
            _audit(request, False, f"{what}: {type(exc).__name__}")
            return error_response(exc, what)
        log.info(
            "%s [%s]: %d matches, %.3f s",
            what,
            " ".join(tag_name(k.tag) for k in qido.keys),
            len(found),
            time.monotonic() - started,
        )
        _audit(request, True, f"{what}: {len(found)} matches")
        headers = {"Warning": warning} if warning else {}
        if fmt == "json":
            return await body_response(request, json.dumps(found, ensure_ascii=False).encode("utf-8"), DICOM_JSON, headers)
        stream = MultipartStream(request, DICOM_XML)
        stream.response.headers.update(headers)
        for obj in found:
            await stream.part(DICOM_XML, [native_xml(obj)])
        return await stream.finish()

    return handler


def add_routes(router: Any, prefix: str) -> None:
    """The QIDO-RS resources under ``prefix`` (a DICOMweb root); ``router`` is the
    app's `_Router`."""
    for path, resource in (
        ("studies", "studies"),
        ("series", "series"),
        ("instances", "instances"),
        ("studies/{study}/series", "series"),
        ("studies/{study}/instances", "instances"),
        ("studies/{study}/series/{series}/instances", "instances"),
    ):
        router.add("GET", f"{prefix}/{path}", _search_handler(resource))
