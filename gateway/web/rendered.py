"""Rendered images (PS3.18 10.4 Rendered Resources, thumbnails) and WADO-URI (PS3.18 9).

A frame is fetched as stored (its label checked as for /frames), decoded, mapped to
modality values (Modality LUT Sequence, else Rescale Slope/Intercept), put through the request's window, else the instance's VOI LUT
Sequence, else its own window (each window with its VOI LUT Function: LINEAR,
LINEAR_EXACT or SIGMOID), MONOCHROME1 inverted, colour as RGB, fitted to the
``viewport`` and encoded by Pillow. A multi-frame instance renders its first frame
(the frame resources name any frame). A study or series renders every instance that
has an image, one part each of a ``multipart/related`` answer in the selected
rendered media type (PS3.18 10.4.1.1.3: the resource contains all of its instances),
each part naming its instance's rendered resource in Content-Location; its
thumbnail is one representative image, its first instance's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import pydicom
from aiohttp import web
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from gateway.audit.auditor import tally_of
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frame_check import actual_syntax
from gateway.codecs.frames import decode_frame_described
from gateway.codecs.render import VoiLut, VoiWindow, render_frame, rescale_from_dataset, voi_from_dataset
from gateway.dicomweb.accept import parse_accept
from gateway.dicomweb.mediatypes import MULTIPART_RELATED
from gateway.dicomweb.params import whole_number
from gateway.model.json import dataset_from_json
from gateway.model.search import Search
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.transcode import part10_file
from gateway.upstream.base import JsonObject, Retrieved
from gateway.uids import is_valid_uid
from gateway.upstream.errors import NotFound, UpstreamRejected
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
    text_error,
)
from gateway.web.keys import RETRIEVER, UPSTREAM
from gateway.web.video import asks_video, video_of
from gateway.web.wado import PIXEL_TAGS, InstanceBody, InstanceForm, audit_sent, fetch_instance, frames_of, metadata_of

log = logging.getLogger("gateway.web")

FORMATS = {"image/jpeg": "jpeg", "image/png": "png", "image/gif": "gif"}
# Pixel description, Window Center/Width, Rescale Intercept/Slope, VOI LUT Function
RENDER_TAGS = (*PIXEL_TAGS, 0x00281050, 0x00281051, 0x00281052, 0x00281053, 0x00281056)
# LUT Sequences: their LUT Data is bulk data in metadata, so they are read from the instance
MODALITY_LUT_SEQUENCE, VOI_LUT_SEQUENCE = "00283000", "00283010"
THUMBNAIL = (128, 128)


@dataclass(frozen=True)
class RenderOptions:
    fmt: str
    window: VoiWindow | None  # the request's, in modality units
    viewport: tuple[int, int] | None
    quality: int


def render_format(accept: str | None) -> str:
    """The rendered format the Accept header asks for (``image/png``, or as the parts
    of a multipart answer: ``multipart/related; type=image/png``)."""
    for r in parse_accept(accept):
        if r.media in FORMATS:
            return FORMATS[r.media]
        if r.media == MULTIPART_RELATED and r.part_type in FORMATS:
            return FORMATS[r.part_type]
        if r.media in ("*/*", "image/*", "*"):
            return "jpeg"
    raise NotAcceptable("rendered images are served as image/jpeg, image/png or image/gif")


def _numbers(name: str, text: str, count: int) -> list[float]:
    """At least ``count`` finite numbers (``nan`` and ``inf`` parse as floats, and would
    reach the renderer); 400 otherwise."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) < count or not all(math.isfinite(v) for v in values):
        wanted = "a number" if count == 1 else f"{count} numbers separated by commas"
        raise web.HTTPBadRequest(text=f"{name}: expected {wanted}\n")
    return values


def _whole_numbers(name: str, text: str, count: int, highest: int | None = None) -> list[int]:
    """The first ``count`` of comma-separated whole numbers, each from 1 (to
    ``highest``): a viewport's size, a frame number, a quality; 400 otherwise."""
    values = [n for n in map(whole_number, text.split(",")[:count]) if n is not None]
    if len(values) < count or not all(1 <= v <= (highest or v) for v in values):
        limits = f"from 1 to {highest}" if highest else "from 1"
        wanted = f"a whole number {limits}" if count == 1 else f"{count} whole numbers {limits}, separated by commas"
        raise web.HTTPBadRequest(text=f"{name}: expected {wanted}\n")
    return values


def rs_options(request: web.Request, thumbnail: bool) -> RenderOptions:
    """``window=center,width[,function]`` (function ``linear``, ``linear-exact`` or
    ``sigmoid``), ``viewport=vw,vh[,...]``, ``quality`` (PS3.18 8.3.5)."""
    q = request.query
    window = None
    if "window" in q:
        pieces = q["window"].split(",")
        center, width = _numbers("window", ",".join(pieces[:2]), 2)
        function = pieces[2].strip().upper().replace("-", "_") if len(pieces) > 2 else "LINEAR"
        try:
            window = VoiWindow(center, width, function)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"window: {exc} (functions: linear, linear-exact, sigmoid)\n") from None
    viewport = THUMBNAIL if thumbnail else None
    if "viewport" in q:  # vw,vh and an optional source region, which is not applied
        vw, vh = _whole_numbers("viewport", q["viewport"], 2)
        viewport = (vw, vh)
    quality = _whole_numbers("quality", q["quality"], 1, 100)[0] if "quality" in q else 90
    return RenderOptions(render_format(accept_of(request)), window, viewport, quality)


def _render(data: bytes, label: str, ds: Dataset, options: RenderOptions, header: Dataset | None = None) -> bytes:
    """Decode one stored frame and render it (blocking, CPU-bound); ``header`` is the
    instance's own, read when the metadata cannot carry what rendering needs: the
    Palette Color Lookup Tables of a PALETTE COLOR image, a Modality or VOI LUT Sequence."""
    desc = PixelDescription.from_dataset(ds)
    source = actual_syntax(data, label, desc)
    arr, decoded = decode_frame_described(data, source, desc, as_rgb=True)
    if desc.photometric_interpretation == "PALETTE COLOR" and header is not None:
        arr = apply_color_lut(arr, header)
        bits = arr.dtype.itemsize * 8
        decoded = PixelDescription(desc.rows, desc.columns, 3, bits, bits, 0, "RGB")
    voi: VoiWindow | VoiLut | None = None
    described = header if header is not None else ds
    if decoded.samples_per_pixel == 1:
        voi = options.window or voi_from_dataset(described)
    return render_frame(
        arr, decoded, options.fmt, None, options.viewport, options.quality, voi=voi, rescale=rescale_from_dataset(described)
    )


async def _first_instance(request: web.Request, study: str, series: str | None) -> InstanceRef:
    """The study's or series' first instance (the first with an image, from the
    metadata, in a named HealthImaging image set, which searches do not see)."""
    if image_set_id(request):
        for obj in await metadata_of(request, study, series, None):
            ref = InstanceRef(study, _text(obj, "0020000E"), _text(obj, "00080018"), "")
            if "00280010" in obj and is_valid_uid(ref.series_uid) and is_valid_uid(ref.sop_instance_uid):
                return ref
        raise NotFound("no instance to render")
    upstream = request.app[UPSTREAM]
    search = Search(include=(0x0020000E, 0x00080018), study_uid=study, series_uid=series)
    async with contextlib.aclosing(upstream.search_for_instances(search)) as found:
        async for obj in found:
            series_uid = str(((obj.get("0020000E") or {}).get("Value") or [series or ""])[0])
            sop = str(((obj.get("00080018") or {}).get("Value") or [""])[0])
            if is_valid_uid(sop) and is_valid_uid(series_uid):
                return InstanceRef(study, series_uid, sop, "")
    raise NotFound("no instance to render")


async def _instance_header(request: web.Request, ref: InstanceRef) -> Dataset:
    """The instance's header up to its pixel data, for what is bulk data in metadata
    (palette tables, VOI LUT data)."""
    retrieved = await fetch_instance(request, ref)
    try:
        head = await asyncio.to_thread(_header, retrieved)
    finally:
        retrieved.release()
    return head


def _header(retrieved: Retrieved) -> Dataset:
    with part10_file(retrieved) as fp:
        return pydicom.dcmread(fp, stop_before_pixels=True)


def _media(options: RenderOptions) -> str:
    return next(m for m, f in FORMATS.items() if f == options.fmt)


async def rendered_image(
    request: web.Request, ref: InstanceRef, frame: int, options: RenderOptions, metadata: JsonObject | None = None
) -> bytes:
    """Frame ``frame`` of the instance, rendered; ``metadata``: the instance's, when
    the caller has it already."""
    if metadata is None:
        found = await metadata_of(request, ref.study_uid, ref.series_uid, ref.sop_instance_uid)
        if not found:
            raise NotFound("no such instance")
        metadata = found[0]
    ds = dataset_from_json(metadata, RENDER_TAGS)
    if 0x00280010 not in ds:
        raise UpstreamRejected("the instance has no image to render", 406)
    count = int(ds.get("NumberOfFrames") or 1)
    if frame > count:
        raise UpstreamRejected(f"the instance has {count} frame(s)", 400)
    luts = MODALITY_LUT_SEQUENCE in metadata or VOI_LUT_SEQUENCE in metadata and options.window is None
    needs_header = ds.get("PhotometricInterpretation") == "PALETTE COLOR" or luts
    header = await _instance_header(request, ref) if needs_header else None
    async with contextlib.aclosing(frames_of(request, ref, [frame])) as frames:
        got = await anext(frames)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        request.app[RETRIEVER].codecs, _render, got.data, got.transfer_syntax, ds, options, header
    )


async def render(
    request: web.Request, ref: InstanceRef, frame: int, options: RenderOptions, metadata: JsonObject | None = None
) -> web.Response:
    return web.Response(body=await rendered_image(request, ref, frame, options, metadata), content_type=_media(options))


async def render_each(request: web.Request, study: str, series: str | None, options: RenderOptions) -> web.StreamResponse:
    """Every instance of the study or series that has an image, rendered (frame 1),
    one part each, in series order and by Instance Number within a series; an
    instance that cannot be rendered is left out with a warning. Each is rendered
    as its part is due, so the answer streams whatever the series' size; an archive
    failing once the answer began ends it unterminated (its headers are gone)."""
    metadata = [m for m in await metadata_of(request, study, series, None) if "00280010" in m]
    order = {uid: n for n, uid in enumerate(dict.fromkeys(_text(m, "0020000E") for m in metadata))}
    metadata.sort(key=lambda m: (order[_text(m, "0020000E")], _number(m, "00200013")))
    media = _media(options)
    root = request_root(request)
    level = "series" if series else "study"
    stream: MultipartStream | None = None
    try:
        for obj in metadata:
            ref = InstanceRef(study, _text(obj, "0020000E"), _text(obj, "00080018"), "")
            if not (is_valid_uid(ref.series_uid) and is_valid_uid(ref.sop_instance_uid)):
                continue
            try:
                image = await rendered_image(request, ref, 1, options, obj)
            except (TranscodeError, ValueError, UpstreamRejected, NotFound) as exc:
                log.warning("rendered %s: instance %s left out: %s", level, ref.sop_instance_uid, exc)
                continue
            if stream is None:
                stream = MultipartStream(request, media)
            location = f"{root}/studies/{study}/series/{ref.series_uid}/instances/{ref.sop_instance_uid}/rendered"
            await stream.part(media, [image], f"Content-Location: {location}\r\n")
            if stream.head:
                break
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception as exc:  # noqa: BLE001 - before the answer began, the handler answers it
        if stream is None:
            raise
        log.error("rendered %s: failed after the answer began: %s", level, exc)
        if request.transport is not None:
            request.transport.close()
        return stream.response
    if stream is None:
        raise NotFound("no image to render")
    return await stream.finish()


def _text(obj: JsonObject, key: str) -> str:
    return str(((obj.get(key) or {}).get("Value") or [""])[0])


def _number(obj: JsonObject, key: str) -> float:
    try:
        return float(((obj.get(key) or {}).get("Value") or [0])[0])
    except (TypeError, ValueError):
        return 0.0


async def _video(request: web.Request, ref: InstanceRef, metadata: JsonObject) -> web.StreamResponse | None:
    """The instance's video when the request asks for it (`asks_video`: by name, or
    ``*/*`` of a video instance) and it is stored as video; else None, to render it."""
    accept = accept_of(request)
    if not asks_video(accept, metadata):
        return None
    return await video_of(request, ref, lambda: fetch_instance(request, ref), accept)


def _rendered_handler(thumbnail: bool) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        uids = path_uids(request)
        what = subject("thumbnail" if thumbnail else "rendered", request)
        try:
            metadata = None  # an instance's, read once for the video check and the rendering
            if "instance" in uids and not thumbnail and "frames" not in request.match_info:
                ref = InstanceRef(uids["study"], uids["series"], uids["instance"], "")
                found = await metadata_of(request, ref.study_uid, ref.series_uid, ref.sop_instance_uid)
                if not found:
                    raise NotFound("no such instance")
                metadata = found[0]
                video = await _video(request, ref, metadata)
                if video is not None:
                    return video
            options = rs_options(request, thumbnail)
            frame = 1
            if "frames" in request.match_info:
                frame = whole_number(request.match_info["frames"]) or 0
                if frame < 1:
                    raise web.HTTPBadRequest(text="one positive frame number\n")
            if "instance" in uids:
                ref = InstanceRef(uids["study"], uids["series"], uids["instance"], "")
            elif thumbnail:
                ref = await _first_instance(request, uids["study"], uids.get("series"))
            else:
                return await render_each(request, uids["study"], uids.get("series"), options)
            return await render(request, ref, frame, options, metadata)
        except web.HTTPException:
            raise
        except (TranscodeError, ValueError) as exc:
            return text_error(406, f"{what}: cannot render this image: {exc}")
        except Exception as exc:  # noqa: BLE001
            return error_response(exc, what)

    return handler


async def wado_uri(request: web.Request) -> web.StreamResponse:
    """WADO-URI: ``requestType=WADO&studyUID&seriesUID&objectUID`` with ``contentType``
    (application/dicom, the default here as the SIIM guide expects; image/jpeg,
    image/png, image/gif; a video instance's own video/mp4, video/mpeg or video/H265,
    byte ranges answered), ``frameNumber``, ``rows``/``columns``,
    ``windowCenter``/``windowWidth``, ``transferSyntax``."""
    q = request.query
    if q.get("requestType") != "WADO":
        return text_error(400, "requestType must be WADO")
    uids = {k: q.get(k, "") for k in ("studyUID", "seriesUID", "objectUID")}
    bad = [k for k, v in uids.items() if not is_valid_uid(v)]
    if bad:
        return text_error(400, f"{', '.join(bad)}: missing or not a valid UID")
    ref = InstanceRef(uids["studyUID"], uids["seriesUID"], uids["objectUID"], "")
    content_type = q.get("contentType", "application/dicom").split(",")[0].strip().lower()
    try:
        if content_type == "application/dicom":
            body = InstanceBody(request, await fetch_instance(request, ref), ref)
            try:
                form = InstanceForm(True, q.get("transferSyntax", "1.2.840.10008.1.2.1"))
                await body.prepare(form.syntax)
                response = web.StreamResponse(headers={"Content-Type": f"application/dicom; transfer-syntax={body.syntax}"})
                answer = await send_streamed(request, response, body.chunks)
                audit_sent(request, tally_of([(ref.study_uid, "")]), 1, 0, "WADO-URI")
                return answer
            finally:
                body.release()
        if content_type.startswith("video/"):  # the stored video, as the rendered resource serves it
            video = await video_of(request, ref, lambda: fetch_instance(request, ref), content_type)
            if video is not None:
                return video
        if content_type not in FORMATS:
            raise NotAcceptable("WADO-URI serves application/dicom, image/jpeg, image/png, image/gif and a video's own video/*")
        window = None
        if "windowCenter" in q and "windowWidth" in q:
            center, width = _numbers("windowCenter", q["windowCenter"], 1)[0], _numbers("windowWidth", q["windowWidth"], 1)[0]
            try:
                window = VoiWindow(center, width)
            except ValueError as exc:
                return text_error(400, f"windowWidth: {exc}")
        viewport = None
        if "rows" in q or "columns" in q:
            rows = _whole_numbers("rows", q.get("rows", "65535"), 1)[0]
            columns = _whole_numbers("columns", q.get("columns", "65535"), 1)[0]
            viewport = (columns, rows)
        frame = _whole_numbers("frameNumber", q.get("frameNumber", "1"), 1)[0]
        options = RenderOptions(FORMATS[content_type], window, viewport, _whole_numbers("imageQuality", q.get("imageQuality", "90"), 1, 100)[0])
        return await render(request, ref, frame, options)
    except web.HTTPException:
        raise
    except (TranscodeError, ValueError) as exc:
        what = "send this instance in that transfer syntax" if content_type == "application/dicom" else "render this image"
        return text_error(406, f"WADO-URI: cannot {what}: {exc}")
    except Exception as exc:  # noqa: BLE001
        return error_response(exc, "WADO-URI")


def add_routes(router: Any, prefix: str) -> None:
    """Rendered and thumbnail resources at every level under ``prefix``."""
    study = f"{prefix}/studies/{{study}}"
    series = f"{study}/series/{{series}}"
    instance = f"{series}/instances/{{instance}}"
    for path in (study, series, instance, f"{instance}/frames/{{frames}}"):
        router.add("GET", f"{path}/rendered", _rendered_handler(False))
        router.add("GET", f"{path}/thumbnail", _rendered_handler(True))


def add_wado_uri(router: Any) -> None:
    for path in ("/wado", "/wadouri"):
        router.add("GET", path, wado_uri)
