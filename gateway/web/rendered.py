"""Rendered images (PS3.18 10.4 Rendered Resources, thumbnails) and WADO-URI (PS3.18 9).

A frame is fetched as stored (its label checked as for /frames), decoded, windowed
with the request's window or the instance's own (both in modality units, Rescale
Slope/Intercept undone), MONOCHROME1 inverted, colour as RGB, fitted to the
``viewport`` and encoded by Pillow. A study or series renders its first instance;
a multi-frame instance its first frame (the frame resources name any frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import pydicom
from aiohttp import web
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut

from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frame_check import actual_syntax
from gateway.codecs.frames import decode_frame_described
from gateway.codecs.render import render_frame, window_from_dataset
from gateway.dicomweb.accept import parse_accept
from gateway.model.json import dataset_from_json
from gateway.model.search import Search
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.transcode import part10_file
from gateway.upstream.base import Retrieved
from gateway.uids import is_valid_uid
from gateway.upstream.errors import NotFound, UpstreamRejected
from gateway.web.common import NotAcceptable, error_response, path_uids, send_streamed, subject, text_error
from gateway.web.keys import RETRIEVER, UPSTREAM
from gateway.web.wado import PIXEL_TAGS, InstanceBody, InstanceForm, fetch_instance, frames_of, metadata_of

log = logging.getLogger("gateway.web")

FORMATS = {"image/jpeg": "jpeg", "image/png": "png", "image/gif": "gif"}
RENDER_TAGS = (*PIXEL_TAGS, 0x00281050, 0x00281051, 0x00281052, 0x00281053)
THUMBNAIL = (128, 128)


@dataclass(frozen=True)
class RenderOptions:
    fmt: str
    window: tuple[float, float] | None  # center, width in modality units
    viewport: tuple[int, int] | None
    quality: int


def render_format(accept: str | None) -> str:
    for r in parse_accept(accept):
        if r.media in FORMATS:
            return FORMATS[r.media]
        if r.media in ("*/*", "image/*", "*"):
            return "jpeg"
    raise NotAcceptable("rendered images are served as image/jpeg, image/png or image/gif")


def _numbers(name: str, text: str, count: int) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: expected {count} numbers separated by commas\n") from None
    if len(values) < count:
        raise web.HTTPBadRequest(text=f"{name}: expected {count} numbers separated by commas\n")
    return values


def rs_options(request: web.Request, thumbnail: bool) -> RenderOptions:
    """``window=center,width[,function]``, ``viewport=vw,vh[,...]``, ``quality`` (PS3.18 8.3.5)."""
    q = request.query
    window = None
    if "window" in q:
        pieces = q["window"].split(",")
        center, width = _numbers("window", ",".join(pieces[:2]), 2)
        function = pieces[2].strip().lower() if len(pieces) > 2 else "linear"
        if function not in ("linear", "linear_exact"):
            raise web.HTTPBadRequest(text="window: only the linear VOI LUT function is supported\n")
        window = (center, width)
    viewport = THUMBNAIL if thumbnail else None
    if "viewport" in q:
        vw, vh = _numbers("viewport", q["viewport"], 2)[:2]
        viewport = (int(vw), int(vh))
    quality = int(_numbers("quality", q["quality"], 1)[0]) if "quality" in q else 90
    return RenderOptions(render_format(request.headers.get("Accept")), window, viewport, quality)


def _render(data: bytes, label: str, ds: Dataset, options: RenderOptions, palette: Dataset | None = None) -> bytes:
    """Decode one stored frame and render it (blocking, CPU-bound); ``palette`` holds
    the Palette Color Lookup Tables of a PALETTE COLOR image."""
    desc = PixelDescription.from_dataset(ds)
    source = actual_syntax(data, label, desc)
    arr, decoded = decode_frame_described(data, source, desc, as_rgb=True)
    if palette is not None:
        arr = apply_color_lut(arr, palette)
        bits = arr.dtype.itemsize * 8
        decoded = PixelDescription(desc.rows, desc.columns, 3, bits, bits, 0, "RGB")
    window = None
    if decoded.samples_per_pixel == 1:
        if options.window is not None:
            slope = float(ds.get("RescaleSlope") or 1.0)
            intercept = float(ds.get("RescaleIntercept") or 0.0)
            center, width = options.window
            window = ((center - intercept) / slope, width / abs(slope))
        else:
            window = window_from_dataset(ds)
    return render_frame(arr, decoded, options.fmt, window, options.viewport, options.quality)


async def _first_instance(request: web.Request, study: str, series: str | None) -> InstanceRef:
    upstream = request.app[UPSTREAM]
    search = Search(include=(0x0020000E, 0x00080018), study_uid=study, series_uid=series)
    async with contextlib.aclosing(upstream.search_for_instances(search)) as found:
        async for obj in found:
            series_uid = str(((obj.get("0020000E") or {}).get("Value") or [series or ""])[0])
            sop = str(((obj.get("00080018") or {}).get("Value") or [""])[0])
            if is_valid_uid(sop) and is_valid_uid(series_uid):
                return InstanceRef(study, series_uid, sop, "")
    raise NotFound("no instance to render")


async def _palette(request: web.Request, ref: InstanceRef) -> Dataset:
    """The instance's header up to its pixel data: the palette tables are bulk data in
    metadata, so they are read from the instance itself."""
    retrieved = await fetch_instance(request, ref)
    try:
        head = await asyncio.to_thread(_header, retrieved)
    finally:
        retrieved.release()
    return head


def _header(retrieved: Retrieved) -> Dataset:
    with part10_file(retrieved) as fp:
        return pydicom.dcmread(fp, stop_before_pixels=True)


async def render(request: web.Request, ref: InstanceRef, frame: int, options: RenderOptions) -> web.Response:
    metadata = await metadata_of(request, ref.study_uid, ref.series_uid, ref.sop_instance_uid)
    if not metadata:
        raise NotFound("no such instance")
    ds = dataset_from_json(metadata[0], RENDER_TAGS)
    if 0x00280010 not in ds:
        raise UpstreamRejected("the instance has no image to render", 406)
    count = int(ds.get("NumberOfFrames") or 1)
    if frame > count:
        raise UpstreamRejected(f"the instance has {count} frame(s)", 400)
    palette = await _palette(request, ref) if ds.get("PhotometricInterpretation") == "PALETTE COLOR" else None
    async with contextlib.aclosing(frames_of(request, ref, [frame])) as frames:
        got = await anext(frames)
    loop = asyncio.get_running_loop()
    image = await loop.run_in_executor(
        request.app[RETRIEVER].codecs, _render, got.data, got.transfer_syntax, ds, options, palette
    )
    media = next(m for m, f in FORMATS.items() if f == options.fmt)
    return web.Response(body=image, content_type=media)


def _rendered_handler(thumbnail: bool) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        uids = path_uids(request)
        what = subject("thumbnail" if thumbnail else "rendered", request)
        try:
            options = rs_options(request, thumbnail)
            frame = 1
            if "frames" in request.match_info:
                text = request.match_info["frames"]
                if not text.isdigit() or int(text) < 1:
                    raise web.HTTPBadRequest(text="one positive frame number\n")
                frame = int(text)
            if "instance" in uids:
                ref = InstanceRef(uids["study"], uids["series"], uids["instance"], "")
            else:
                ref = await _first_instance(request, uids["study"], uids.get("series"))
            return await render(request, ref, frame, options)
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
    image/png, image/gif), ``frameNumber``, ``rows``/``columns``,
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
                return await send_streamed(request, response, body.chunks)
            finally:
                body.release()
        if content_type not in FORMATS:
            raise NotAcceptable("WADO-URI serves application/dicom, image/jpeg, image/png and image/gif")
        window = None
        if "windowCenter" in q and "windowWidth" in q:
            window = (_numbers("windowCenter", q["windowCenter"], 1)[0], _numbers("windowWidth", q["windowWidth"], 1)[0])
        viewport = None
        if "rows" in q or "columns" in q:
            rows = int(_numbers("rows", q.get("rows", "65535"), 1)[0])
            columns = int(_numbers("columns", q.get("columns", "65535"), 1)[0])
            viewport = (columns, rows)
        frame = int(_numbers("frameNumber", q.get("frameNumber", "1"), 1)[0])
        options = RenderOptions(FORMATS[content_type], window, viewport, int(_numbers("imageQuality", q.get("imageQuality", "90"), 1)[0]))
        return await render(request, ref, max(frame, 1), options)
    except web.HTTPException:
        raise
    except (TranscodeError, ValueError) as exc:
        return text_error(406, f"WADO-URI: cannot render this image: {exc}")
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
