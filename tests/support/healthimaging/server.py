"""The emulator's two HTTP hosts, in a thread of their own.

``dicomweb_url`` stands for ``https://dicom-medical-imaging.{region}.amazonaws.com``
(STOW-RS, QIDO-RS, WADO-RS under ``/datastore/{id}``), ``runtime_url`` for
``https://runtime-medical-imaging.{region}.amazonaws.com`` (the native operations).
Every request, on either host, first has its SigV4 signature verified (`sigv4`),
then is counted against its operation's quota (`throttle`), then served. Errors are
AWS's: JSON ``{"message": ...}`` with the error type in ``x-amzn-ErrorType``.
`requests` records each request's operation, status and error type for tests.

No study-level or series-level retrieval exists on the service; like any path it does
not serve, ``GET /studies/{s}`` and ``GET /studies/{s}/series/{se}`` are answered 404
``UnknownOperationException`` (what the service answers is not documented).
"""

from __future__ import annotations

import asyncio
import errno
import email.message
import json
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Self

from aiohttp import web

from tests.support.healthimaging import metadata, native, search, sigv4
from tests.support.healthimaging.identity import AuthFailure, Identities
from tests.support.healthimaging.native import ApiError
from tests.support.healthimaging.store import (
    EXPLICIT_VR_LE,
    Datastore,
    ImageSet,
    Instance,
    Unstorable,
    convert,
    native_frames,
    new_id,
    prepare,
)
from tests.support.healthimaging.throttle import Throttle
from tests.support.ports import free_port, wait_for_port

SERVICE = "medical-imaging"
MAX_STOW_BYTES = 1_000_000_000  # "up to 1GB of DICOM data per request"
DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
# The media type of a frame in each compressed syntax (PS3.18 Table 8.7.3-5) that
# the frames Accept may name instead of application/octet-stream.
FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}
# GetImageFrame's Content-Type per stored syntax.
IMAGE_FRAME_TYPES = {
    "1.2.840.10008.1.2.4.201": "image/jph",
    "1.2.840.10008.1.2.4.202": "image/jph",
    "1.2.840.10008.1.2.4.203": "image/jph",
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.90": "image/j2c",
    "1.2.840.10008.1.2.4.91": "image/j2c",
}

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"


@dataclass(frozen=True)
class Record:
    """One request as the emulator saw it."""

    host: str  # "dicomweb" or "runtime"
    operation: str
    method: str
    path: str
    status: int
    error_type: str = ""
    access_key: str = ""
    message: str = ""  # the error message, if any


Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


def aws_error(status: int, error_type: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps({"message": message}).encode(),
        content_type="application/json",
        headers={"x-amzn-ErrorType": error_type, "x-amzn-RequestId": str(uuid.uuid4())},
    )


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str]]]:
    """An Accept header as (media type, parameters), in the order given."""
    ranges = []
    for item in accept.split(","):
        if not item.strip():
            continue
        msg = email.message.Message()
        msg["content-type"] = item.strip()
        params = {k.lower(): v for k, v in msg.get_params()[1:]}
        ranges.append((msg.get_content_type(), params))
    return ranges


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart body (RFC 2046): headers (lower-case names) and content."""
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise ValueError("no boundary in the body")
    parts = []
    pos = start + len(delimiter)
    while True:
        if body[pos : pos + 2] == b"--":
            return parts
        line_end = body.find(b"\r\n", pos)
        head_end = body.find(b"\r\n\r\n", line_end)
        if line_end < 0 or head_end < 0:
            raise ValueError("part without headers")
        headers = {}
        for line in body[line_end + 2 : head_end].split(b"\r\n"):
            name, _, value = line.decode("latin-1").partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        content_start = head_end + 4
        next_delimiter = body.find(b"\r\n" + delimiter, content_start)
        if next_delimiter < 0:
            raise ValueError("part without a closing boundary")
        parts.append((headers, body[content_start:next_delimiter]))
        pos = next_delimiter + 2 + len(delimiter)


class Emulator:
    """``Emulator().start()``; ``stop()`` closes both hosts and joins the thread.

    ``quota_scale`` multiplies every throttle rate and burst, ``quotas`` replaces the
    table of them (operation: (rate, burst)); ``clock_offset`` moves the emulator's
    clock (seconds, also in its Date headers) to emulate clock skew;
    ``max_stow_bytes`` is the STOW-RS size limit.
    """

    def __init__(
        self,
        region: str = "us-east-1",
        datastore_id: str | None = None,
        quota_scale: float = 1.0,
        clock_offset: float = 0.0,
        max_stow_bytes: int = MAX_STOW_BYTES,
        quotas: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.region = region
        self.identities = Identities()
        self.datastore = Datastore(datastore_id or new_id())
        self.throttle = Throttle(quota_scale, quotas)
        self.clock_offset = clock_offset
        self.max_stow_bytes = max_stow_bytes
        self.requests: list[Record] = []
        self._study_views: dict[str, tuple[int, Any]] = {}
        self.dicomweb_port = free_port()
        self.runtime_port = free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self._ready = threading.Event()
        self._failure: BaseException | None = None

    # ---- lifecycle --------------------------------------------------------------------

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.dicomweb_port}"

    @property
    def runtime_url(self) -> str:
        return f"http://127.0.0.1:{self.runtime_port}"

    @property
    def datastore_url(self) -> str:
        return f"{self.dicomweb_url}/datastore/{self.datastore.id}"

    def add_key(self, access_key: str | None = None, secret_key: str | None = None, session_token: str | None = None) -> tuple[str, str]:
        """Accept a key pair (a new random one by default); returns it."""
        access_key = access_key or "AKIA" + secrets.token_hex(8).upper()
        secret_key = secret_key or secrets.token_urlsafe(30)
        self.identities.add(access_key, secret_key, session_token)
        return access_key, secret_key

    def start(self, timeout: float = 10.0) -> Emulator:
        self._thread = threading.Thread(target=self._run, name="healthimaging-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._failure is not None:
            raise RuntimeError(f"emulator did not start: {self._failure!r}")
        wait_for_port("127.0.0.1", self.dicomweb_port, timeout)
        wait_for_port("127.0.0.1", self.runtime_port, timeout)
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._close())
        loop.close()

    async def _open(self) -> None:
        """Listen on both ports. One taken meanwhile (`free_port` only says it was
        free; an outgoing connection may get it as its local port) is replaced by
        another: the URLs are read after `start`."""
        for app, attr in ((self._dicomweb_app(), "dicomweb_port"), (self._runtime_app(), "runtime_port")):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            for attempt in range(5):
                try:
                    await web.TCPSite(runner, "127.0.0.1", getattr(self, attr)).start()
                    break
                except OSError as exc:
                    if exc.errno != errno.EADDRINUSE or attempt == 4:
                        raise
                    setattr(self, attr, free_port())
            self._runners.append(runner)

    async def _close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
            self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what tests ask ----------------------------------------------------------------

    def now(self) -> float:
        return time.time() + self.clock_offset

    def refusals(self) -> list[Record]:
        """Requests refused for their signature or credentials."""
        return [r for r in self.requests if r.status in (400, 403) and r.error_type.endswith(("SignatureException", "ClientException", "TokenException"))]

    def load(self, files: Iterable[bytes]) -> None:
        """Store Part 10 files directly, as an import job would: for tests that need
        thousands of studies without sending each over STOW-RS."""
        for raw in files:
            self.datastore.add(prepare(raw))

    def instance(self, sop_instance_uid: str) -> Instance | None:
        return next((i for i in self.datastore.instances() if i.sop_instance_uid == sop_instance_uid), None)

    def image_sets(self) -> list[ImageSet]:
        with self.datastore.lock:
            return list(self.datastore.image_sets.values())

    # ---- the pipeline every request goes through ------------------------------------------

    def _middleware(self, host: str, max_body: int) -> Any:
        @web.middleware
        async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
            route = request.match_info.route
            operation = route.name or "UnknownOperation"
            access_key = ""
            message = ""
            try:
                if request.content_length is not None and request.content_length > max_body + (1 << 20):
                    raise AuthFailure(413, "PayloadTooLargeException", f"Request size exceeds {max_body} bytes")
                body = await request.read()
                raw_path, _, raw_query = request.raw_path.partition("?")
                verified = sigv4.verify(
                    request.method, raw_path, raw_query, request.headers, body,
                    identities=self.identities, region=self.region, service=SERVICE, now=self.now(),
                )
                access_key = verified.access_key
                if len(verified.body) > max_body:
                    raise AuthFailure(413, "PayloadTooLargeException", f"Request size exceeds {max_body} bytes")
                if not self.throttle.allow(operation):
                    raise ApiError(429, "ThrottlingException", "Rate exceeded")
                if route.name is None:
                    raise ApiError(404, "UnknownOperationException", f"No operation serves {request.method} {request.path}")
                if request.match_info.get("datastore") != self.datastore.id:
                    raise ApiError(404, "ResourceNotFoundException", f"Datastore {request.match_info.get('datastore')} does not exist")
                response = await handler(request, verified.body)
            except (AuthFailure, ApiError) as exc:
                message = exc.message
                response = aws_error(exc.status, exc.error_type, exc.message)
            response.headers["Date"] = formatdate(self.now(), usegmt=True)
            error_type = response.headers.get("x-amzn-ErrorType", "")
            self.requests.append(Record(host, operation, request.method, request.path, response.status, error_type, access_key, message))
            return response

        return authenticate

    def _app(self, host: str, routes: list[tuple[str, str, str, Handler]], max_body: int) -> web.Application:
        app = web.Application(middlewares=[self._middleware(host, max_body)], client_max_size=max_body + (2 << 20))
        for method, path, name, handler in routes:
            app.router.add_route(method, path, handler, name=name)  # type: ignore[arg-type]
        app.router.add_route("*", "/{tail:.*}", self._unknown)
        return app

    async def _unknown(self, request: web.Request, body: bytes) -> web.StreamResponse:
        raise ApiError(404, "UnknownOperationException", f"No operation serves {request.method} {request.path}")

    async def _blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # ---- DICOMweb host ---------------------------------------------------------------------

    def _dicomweb_app(self) -> web.Application:
        base = "/datastore/{datastore}"
        instance = base + "/studies/{study}/series/{series}/instances/{sop}"
        routes: list[tuple[str, str, str, Handler]] = [
            ("POST", base + "/studies", "StoreDICOM", self._stow),
            ("POST", base + "/studies/{study}", "StoreDICOMStudy", self._stow),
            ("GET", base + "/studies", "SearchDICOMStudies", self._search_studies),
            ("GET", base + "/studies/{study}/series", "SearchDICOMSeries", self._search_series),
            ("GET", base + "/series", "SearchDICOMAllSeries", self._search_series),
            ("GET", base + "/studies/{study}/series/{series}/instances", "SearchDICOMInstances", self._search_instances),
            ("GET", base + "/studies/{study}/instances", "SearchDICOMStudyInstances", self._search_instances),
            ("GET", base + "/instances", "SearchDICOMAllInstances", self._search_instances),
            ("GET", instance, "GetDICOMInstance", self._get_instance),
            ("GET", instance + "/metadata", "GetDICOMInstanceMetadata", self._instance_metadata),
            ("GET", base + "/studies/{study}/series/{series}/metadata", "GetDICOMSeriesMetadata", self._series_metadata),
            ("GET", instance + "/frames/{frames}", "GetDICOMInstanceFrames", self._frames),
        ]
        return self._app("dicomweb", routes, self.max_stow_bytes)

    def _retrieve_url(self, study: str, series: str | None = None, sop: str | None = None) -> str:
        url = f"{self.datastore_url}/studies/{study}"
        if series:
            url += f"/series/{series}"
        if sop:
            url += f"/instances/{sop}"
        return url

    async def _stow(self, request: web.Request, body: bytes) -> web.Response:
        study = request.match_info.get("study")
        msg = email.message.Message()
        msg["content-type"] = request.headers.get("Content-Type", "")
        media = msg.get_content_type()
        if media == DICOM:
            files = [body]
        elif media == "multipart/related":
            if (msg.get_param("type") or DICOM) != DICOM:
                raise ApiError(415, "UnsupportedMediaTypeException", "multipart/related parts must be application/dicom")
            try:
                parts = _split_multipart(body, str(msg.get_param("boundary") or ""))
            except ValueError as exc:
                raise ApiError(400, "BadRequestException", f"unreadable multipart body: {exc}") from None
            files = [content for headers, content in parts if headers.get("content-type", DICOM).split(";")[0].strip() == DICOM]
        else:
            raise ApiError(415, "UnsupportedMediaTypeException", f"Content-Type {media} is not supported")
        if not files:
            raise ApiError(400, "BadRequestException", "no DICOM instance in the request")
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for raw in files:
            try:
                inst = await self._blocking(prepare, raw)
                if study and inst.study_uid != study:
                    raise Unstorable(0xA900, "instance not in the study of the request", inst.sop_class_uid, inst.sop_instance_uid)
            except Unstorable as exc:
                failed.append(_sop_item(exc.sop_class_uid, exc.sop_instance_uid, {"00081197": {"vr": "US", "Value": [exc.reason]}}))
                continue
            image_set = self.datastore.add(inst)
            url = self._retrieve_url(inst.study_uid, inst.series_uid, inst.sop_instance_uid)
            if not image_set.primary:
                url += f"?imageSetId={image_set.id}"
            stored.append(_sop_item(inst.sop_class_uid, inst.sop_instance_uid, {"00081190": {"vr": "UR", "Value": [url]}}))
        answer: dict[str, Any] = {}
        if study:
            answer["00081190"] = {"vr": "UR", "Value": [self._retrieve_url(study)]}
        if stored:
            answer[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
        if failed:
            answer[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else 202 if stored else 409
        return web.Response(status=status, body=json.dumps(answer).encode(), content_type=DICOM_JSON)

    def _query(self, request: web.Request, allowed: tuple[str, ...]) -> search.Query:
        try:
            return search.parse_query(request.raw_path.partition("?")[2], allowed)
        except search.BadQuery as exc:
            raise ApiError(400, "ValidationException", str(exc)) from None

    def _answer(self, selected: list[Any], query: search.Query, defaults: tuple[str, ...], extra: Callable[[Any], dict[str, Any]]) -> web.Response:
        window = search.page(selected, query)
        body = [search.to_json(ds, defaults, query, extra) for ds in window]
        return web.Response(body=json.dumps(body).encode(), content_type=DICOM_JSON)

    def _url_of(self, ds: Any) -> dict[str, Any]:
        parts = (str(ds.get("StudyInstanceUID", "")), ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID"))
        return {"00081190": {"vr": "UR", "Value": [self._retrieve_url(parts[0], *(str(p) if p else None for p in parts[1:]))]}}

    async def _search_studies(self, request: web.Request, body: bytes) -> web.Response:
        query = self._query(request, search.STUDY_KEYS)

        def matching() -> list[Any]:
            sets = sorted(self.datastore.primary_sets(), key=lambda s: s.updated_at, reverse=True)
            return search.select([self._study_view(s) for s in sets if s.instances], query)

        studies = self.datastore.remembered(("studies", tuple(query.keys)), matching)
        return self._answer(studies, query, search.STUDY_RETURN, lambda ds: {"00081190": {"vr": "UR", "Value": [self._retrieve_url(str(ds.StudyInstanceUID))]}})

    def _study_view(self, image_set: ImageSet) -> Any:
        """A study's attributes, computed once per image set version."""
        cached = self._study_views.get(image_set.id)
        if cached is None or cached[0] != image_set.version:
            cached = self._study_views[image_set.id] = (image_set.version, search.study_view(image_set))
        return cached[1]

    async def _search_series(self, request: web.Request, body: bytes) -> web.Response:
        study = request.match_info.get("study")
        allowed = search.SERIES_KEYS if study else search.RELATIONAL_SERIES_KEYS
        query = self._query(request, allowed)
        views = []
        for image_set in self.datastore.primary_sets():
            if study and image_set.study_uid != study:
                continue
            for instances in image_set.series().values():
                views.append(search.series_view(image_set, instances))
        views.sort(key=lambda ds: _number(ds.get("SeriesNumber")))
        defaults = search.SERIES_RETURN if study else search.SERIES_RETURN + search.STUDY_RETURN
        return self._answer(search.select(views, query), query, defaults, lambda ds: {"00081190": {"vr": "UR", "Value": [self._retrieve_url(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))]}})

    async def _search_instances(self, request: web.Request, body: bytes) -> web.Response:
        study, series = request.match_info.get("study"), request.match_info.get("series")
        allowed = search.INSTANCE_KEYS if series else search.RELATIONAL_INSTANCE_KEYS
        query = self._query(request, allowed)
        found: list[Instance] = []
        for image_set in self.datastore.primary_sets():
            if study and image_set.study_uid != study:
                continue
            found += [i for i in image_set.instances.values() if not series or i.series_uid == series]
        if series:
            found.sort(key=lambda i: i.number)
        else:
            found.sort(key=lambda i: i.updated, reverse=True)
        defaults = search.INSTANCE_RETURN if series else search.INSTANCE_RETURN + search.SERIES_RETURN + search.STUDY_RETURN
        return self._answer(search.select([i.header for i in found], query), query, defaults, self._url_of)

    def _find(self, request: web.Request) -> Instance:
        info = request.match_info
        inst = self.datastore.find_instance(info["study"], info["series"], info["sop"], request.query.get("imageSetId"))
        if inst is None:
            raise ApiError(404, "ResourceNotFoundException", "Instance not found")
        return inst

    async def _get_instance(self, request: web.Request, body: bytes) -> web.Response:
        inst = self._find(request)
        for media, params in _media_ranges(request.headers.get("Accept", "*/*")):
            if media not in (DICOM, "*/*", "application/*"):
                continue
            wanted = params.get("transfer-syntax", EXPLICIT_VR_LE)
            syntax = inst.stored_syntax if wanted == "*" else wanted
            data = await self._blocking(convert, inst, syntax)
            if data is not None:
                return web.Response(body=data, headers={"Content-Type": f"{DICOM}; transfer-syntax={syntax}"})
        raise ApiError(406, "NotAcceptableException", "The instance cannot be returned in any requested representation")

    def _instance_json(self, inst: Instance) -> dict[str, Any]:
        url = self._retrieve_url(inst.study_uid, inst.series_uid, inst.sop_instance_uid)
        obj = inst.header.to_json_dict(
            bulk_data_threshold=1024, bulk_data_element_handler=lambda elem: f"{url}/bulkdata/{elem.tag:08X}"
        )
        obj["00020010"] = {"vr": "UI", "Value": [inst.stored_syntax]}
        if inst.frames:
            obj["7FE00010"] = {"vr": "OB" if inst.stored_syntax != EXPLICIT_VR_LE else "OW", "BulkDataURI": f"{url}/bulkdata/7FE00010"}
        return obj

    async def _instance_metadata(self, request: web.Request, body: bytes) -> web.Response:
        inst = self._find(request)
        return web.Response(body=json.dumps([self._instance_json(inst)]).encode(), content_type=DICOM_JSON)

    async def _series_metadata(self, request: web.Request, body: bytes) -> web.Response:
        info = request.match_info
        found = self.datastore.series_instances(info["study"], info["series"], request.query.get("imageSetId"))
        if not found:
            raise ApiError(404, "ResourceNotFoundException", "Series not found")
        return web.Response(body=json.dumps([self._instance_json(i) for i in found]).encode(), content_type=DICOM_JSON)

    async def _frames(self, request: web.Request, body: bytes) -> web.Response:
        inst = self._find(request)
        try:
            numbers = [int(n) for n in request.match_info["frames"].split(",")]
        except ValueError:
            raise ApiError(400, "ValidationException", "frame list must be comma-separated integers") from None
        if not inst.frames:
            raise ApiError(404, "ResourceNotFoundException", "Instance has no pixel data")
        if len(set(numbers)) != len(numbers) or any(not 1 <= n <= len(inst.frames) for n in numbers):
            raise ApiError(400, "ValidationException", f"frame numbers must be distinct and from 1 to {len(inst.frames)}")
        for media, params in _media_ranges(request.headers.get("Accept", "")):
            if media != "multipart/related":
                continue
            part_type = params.get("type", OCTET_STREAM)
            wanted = params.get("transfer-syntax", EXPLICIT_VR_LE)
            syntax = inst.stored_syntax if wanted == "*" else wanted
            if part_type not in (OCTET_STREAM, FRAME_MEDIA_TYPES.get(syntax)):
                continue
            if syntax == inst.stored_syntax:
                frames: list[bytes] | None = inst.frames
            elif syntax == EXPLICIT_VR_LE:
                frames = await self._blocking(native_frames, inst)
            else:
                frames = None
            if frames is None:
                continue
            boundary = secrets.token_hex(16)
            chunks = []
            for n in numbers:
                chunks.append(f"--{boundary}\r\nContent-Type: {part_type}; transfer-syntax={syntax}\r\n\r\n".encode())
                chunks.append(frames[n - 1])
                chunks.append(b"\r\n")
            chunks.append(f"--{boundary}--\r\n".encode())
            content_type = f'multipart/related; type="{part_type}"; transfer-syntax={syntax}; boundary={boundary}'
            return web.Response(body=b"".join(chunks), headers={"Content-Type": content_type})
        raise ApiError(406, "NotAcceptableException", "The frames cannot be returned in any requested representation")

    # ---- runtime host (native API) ------------------------------------------------------

    def _runtime_app(self) -> web.Application:
        base = "/datastore/{datastore}"
        image_set = base + "/imageSet/{imageSet}"
        routes: list[tuple[str, str, str, Handler]] = [
            ("POST", base + "/searchImageSets", "SearchImageSets", self._search_image_sets),
            ("POST", image_set + "/getImageSet", "GetImageSet", self._get_image_set),
            ("POST", image_set + "/getImageSetMetadata", "GetImageSetMetadata", self._get_image_set_metadata),
            ("POST", image_set + "/getImageFrame", "GetImageFrame", self._get_image_frame),
            ("POST", image_set + "/listImageSetVersions", "ListImageSetVersions", self._list_versions),
        ]
        return self._app("runtime", routes, 1 << 20)

    @staticmethod
    def _json_body(body: bytes) -> Any:
        if not body.strip():
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise native.validation("request body is not JSON") from None

    async def _search_image_sets(self, request: web.Request, body: bytes) -> web.Response:
        answer = native.search_image_sets(
            self.datastore, self._json_body(body), request.query.get("maxResults"), request.query.get("nextToken")
        )
        return web.json_response(answer)

    async def _get_image_set(self, request: web.Request, body: bytes) -> web.Response:
        found = native.image_set(self.datastore, request.match_info["imageSet"])
        version = native.version_of(found, request.query.get("version"))
        return web.json_response(native.properties(self.datastore, found, version, self.region))

    async def _get_image_set_metadata(self, request: web.Request, body: bytes) -> web.Response:
        found = native.image_set(self.datastore, request.match_info["imageSet"])
        version = native.version_of(found, request.query.get("version"))
        document = await self._blocking(metadata.image_set_metadata, self.datastore.id, found, version)
        return web.Response(
            body=metadata.gzipped(document), headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    async def _get_image_frame(self, request: web.Request, body: bytes) -> web.Response:
        found = native.image_set(self.datastore, request.match_info["imageSet"])
        info = self._json_body(body)
        frame_id = info.get("imageFrameId") if isinstance(info, dict) else None
        if not frame_id:
            raise native.validation("imageFrameInformation.imageFrameId is required")
        for inst in list(found.instances.values()):
            if frame_id in inst.frame_ids:
                data = inst.frames[inst.frame_ids.index(frame_id)]
                content_type = IMAGE_FRAME_TYPES.get(inst.stored_syntax, OCTET_STREAM)
                return web.Response(body=data, headers={"Content-Type": content_type})
        raise native.not_found(f"Image frame {frame_id} does not exist in image set {found.id}")

    async def _list_versions(self, request: web.Request, body: bytes) -> web.Response:
        found = native.image_set(self.datastore, request.match_info["imageSet"])
        return web.json_response(native.versions(found, request.query.get("maxResults"), request.query.get("nextToken")))


def _sop_item(sop_class: str, sop_instance: str, extra: dict[str, Any]) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    item.update(extra)
    return item


def _number(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
