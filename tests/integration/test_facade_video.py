"""Video instances through the facade: an H.264 clip in MP4 (written by PyAV's FFmpeg
and libx264), stored as Video Photographic Image Storage in MPEG-4 AVC/H.264 High
Profile (1.2.840.10008.1.2.4.102), its stream split over two fragments. curl asks its
rendered resource, its Pixel Data bulk data and WADO-URI, whole and by byte ranges, over the
embedded archive and over Orthanc (retrieved from it once: the ranges after come from
the facade's cache); OHIF Viewer 3 in Chromium opens the study and plays
it in its video viewport, seeking (which a browser does only with ranges)."""

from __future__ import annotations

import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import av
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from tests.integration.test_facade_browser import _ohif_config
from tests.support.archiveproxy import ArchiveProxy
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.ohif import ohif_dist
from tests.support.orthanc import Orthanc
from tests.support.staticsite import StaticSite
from tests.support.synth import ct_series

VIDEO_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4.1"
H264_HIGH = "1.2.840.10008.1.2.4.102"
FRAMES, RATE, WIDTH, HEIGHT = 30, 10, 320, 240


def mp4_clip() -> bytes:
    """Three seconds of a white bar crossing a black field, H.264 High profile in MP4
    (its index at the end, as FFmpeg writes it by default: a player must ask for the
    file's end before it can play)."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"profile": "high"}
        for n in range(FRAMES):
            frame = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
            frame[:, (n * 10) % WIDTH : (n * 10) % WIDTH + 20] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def video_instance(clip: bytes) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = VIDEO_PHOTOGRAPHIC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = H264_HIGH
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.StudyDescription = "VIDEO1", "Video^Clip", "OHIF video"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.StudyDate = "XC", 1, 1, "20261127"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = HEIGHT, WIDTH, 3
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "YBR_PARTIAL_420", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.NumberOfFrames, ds.FrameTime, ds.CineRate = FRAMES, 1000 / RATE, RATE
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    middle = len(clip) // 4 * 2  # fragments of even length: no padding inside the stream
    ds.PixelData = encapsulate([clip[:middle], clip[middle:]])  # two fragments, one stream
    ds["PixelData"].VR = "OB"
    return ds


@pytest.fixture(scope="module")
def clip() -> bytes:
    """The clip padded to an even length, as its fragments hold it (PS3.5 A.4)."""
    data = mp4_clip()
    return data + b"\0" * (len(data) % 2)


@pytest.mark.slow
@pytest.mark.parametrize("upstream", ["local", "orthanc"])
def test_a_video_is_served_as_its_stream_whole_and_by_ranges(tmp_path: Path, clip: bytes, upstream: str) -> None:
    ds = video_instance(clip)
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    (ct_path,) = ct_series(tmp_path / "ct", 1, rows=16, columns=16)
    orthanc = Orthanc(workdir=tmp_path / "orthanc") if upstream == "orthanc" else None
    # counts what reaches Orthanc, and holds each retrieval so the first ranges overlap it
    proxy = ArchiveProxy(orthanc.dicomweb_url, slow_retrievals=0.5) if orthanc is not None else None
    gw = Gateway(tmp_path / "gw", upstream_url=proxy.url if proxy else None)
    try:
        if orthanc is not None and proxy is not None:
            orthanc.start()
            proxy.start()
        gw.start()
        for stored in (path, ct_path):
            r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom",
                     "--data-binary", f"@{stored}")
            assert r.status == 200, r.body
        gw.wait_counts(delivered=2)
        instance = f"{gw.web_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        rendered = f"{instance}/rendered"

        # A browser's first ranges come at once: the ones behind the first wait for its
        # retrieval instead of retrieving the whole instance again (counted below).
        with ThreadPoolExecutor(3) as pool:
            first = list(pool.map(lambda args: curl(rendered, *args), [(), ("--range", "0-99"), ("--header", "Range: bytes=-64")]))
        assert [r.status for r in first] == [200, 206, 206]
        assert [r.body for r in first] == [clip, clip[:100], clip[-64:]]
        whole = curl(rendered)  # curl asks */*, as a <video> element does
        assert whole.status == 200 and whole.content_type == "video/mp4" and whole.body == clip
        assert whole.headers["accept-ranges"] == "bytes" and int(whole.headers["content-length"]) == len(clip)
        part = curl(rendered, "--range", "100-1099")
        assert part.status == 206 and part.body == clip[100:1100]
        assert part.headers["content-range"] == f"bytes 100-1099/{len(clip)}"
        across = curl(rendered, "--range", f"{len(clip) // 2 - 10}-")  # across the fragments' seam, to the end
        assert across.status == 206 and across.body == clip[len(clip) // 2 - 10:]
        tail = curl(rendered, "--header", "Range: bytes=-64")
        assert tail.status == 206 and tail.body == clip[-64:]
        past = curl(rendered, "--range", f"{len(clip)}-")
        assert past.status == 416 and past.headers["content-range"] == f"bytes */{len(clip)}"
        assert curl(rendered, "--header", "Accept: video/mp4").body == clip
        assert curl(f"{rendered}?accept=video/mp4", "--header", "Accept: video/*").body == clip
        refused = curl(rendered, "--header", "Accept: video/mpeg")
        assert refused.status == 406 and b"video/mp4" in refused.body
        wado_uri = (f"{gw.web_url}/wado?requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID={ds.SeriesInstanceUID}"
                    f"&objectUID={ds.SOPInstanceUID}&contentType=video/mp4")
        by_uri = curl(wado_uri, "--range", "10-19")
        assert by_uri.status == 206 and by_uri.content_type == "video/mp4" and by_uri.body == clip[10:20]
        # OHIF's other way: the Pixel Data's bulk data URI with ?accept=video/mp4
        bulk = curl(f"{instance}/bulkdata/7FE00010?accept=video/mp4", "--range", "0-99")
        assert bulk.status == 206 and bulk.content_type == "video/mp4" and bulk.body == clip[:100]
        assert curl(f"{instance}/bulkdata/7FE00010?accept=video/mp4", "--range", f"{len(clip)}-").status == 416
        if proxy is not None:  # retrieved from Orthanc once; every range after from the facade's cache
            assert sum(p.endswith(f"/instances/{ds.SOPInstanceUID}") for p in proxy.requests) == 1, proxy.requests
        metadata = curl(f"{instance}/metadata", "--header", "Accept: application/dicom+json").json()[0]
        if upstream == "local":  # the stored syntax, by which OHIF tells a video from its metadata
            assert metadata["00083002"] == {"vr": "UI", "Value": [H264_HIGH]}
        # an image stays an image: */* renders it, a video type is refused
        ct = pydicom.dcmread(ct_path)
        ct_rendered = f"{gw.web_url}/dicom-web/studies/{ct.StudyInstanceUID}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/rendered"
        assert curl(ct_rendered).content_type == "image/jpeg"
        not_video = curl(ct_rendered, "--header", "Accept: video/mp4")
        assert not_video.status == 406 and b"not stored as video" in not_video.body
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        if proxy is not None:
            proxy.stop()
        if orthanc is not None:
            orthanc.cleanup()


# The <video> element of OHIF's video viewport (cornerstone draws it into a canvas; it
# is not in the page's DOM).
VIDEO = ("(() => { const e = window.cornerstone && window.cornerstone.getRenderingEngines()[0];"
         " const vp = e && e.getViewports()[0]; return vp && vp.videoElement; })()")
VIDEO_JS = f"""() => {{
  const v = {VIDEO};
  return v && v.readyState >= 1 ? {{duration: v.duration, width: v.videoWidth, height: v.videoHeight,
                                   seekable: v.seekable.length ? v.seekable.end(0) : 0, src: v.src}} : null;
}}"""
# A <video> of the browser's own on the same URL, seeked to 2.5 s (OHIF's viewport
# keeps its element's time to itself).
SEEK_JS = """(src) => new Promise((resolve, reject) => {
  const v = document.createElement("video");
  v.muted = true;
  v.onerror = () => reject(new Error("video error " + (v.error && v.error.message)));
  v.onloadedmetadata = () => { v.onseeked = () => resolve(v.currentTime); v.currentTime = 2.5; };
  v.src = src;
})"""


@pytest.mark.slow
def test_ohif_plays_a_video_through_the_facade(tmp_path: Path, clip: bytes, browser: Any) -> None:
    ds = video_instance(clip)
    site = StaticSite(ohif_dist(), spa=True)
    gw = Gateway(tmp_path / "gw", http={"cors_origins": [site.origin]})
    try:
        gw.start()
        path = tmp_path / "video.dcm"
        ds.save_as(path, enforce_file_format=True)
        r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom", "--data-binary", f"@{path}")
        assert r.status == 200, r.body
        gw.wait_counts(delivered=1)
        facade = f"{gw.web_url}/dicom-web"
        site.pages["/app-config.js"] = _ohif_config(facade)
        site.start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        answers: list[tuple[str, int]] = []
        page.on("response", lambda resp: answers.append((resp.url, resp.status)) if resp.url.startswith(facade) else None)
        page.goto(f"{site.origin}/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}")
        page.wait_for_function(f"({VIDEO_JS})() !== null", timeout=60_000)
        played = page.evaluate(VIDEO_JS)
        assert played["src"].endswith(f"/instances/{ds.SOPInstanceUID}/rendered")  # OHIF's way to a video
        assert (played["width"], played["height"]) == (WIDTH, HEIGHT)
        assert abs(played["duration"] - FRAMES / RATE) < 0.2, played
        assert played["seekable"] > 2.5  # the browser may seek: it was answered ranges
        assert abs(page.evaluate(SEEK_JS, played["src"]) - 2.5) < 0.2
        deadline = time.monotonic() + 5
        while not any(url.endswith("/rendered") and status == 206 for url, status in answers):
            assert time.monotonic() < deadline, answers
            page.wait_for_timeout(100)
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()
