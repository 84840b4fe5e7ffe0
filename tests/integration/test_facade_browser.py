"""A real browser against the facade: headless Chromium (Debian's ``chromium``, driven by
Playwright for Python) loading pages from another origin, as a viewer deployed apart
from the gateway does.

* A plain page fetches a QIDO-RS search and a rendered PNG with an ``Authorization``
  header: the browser must get its CORS preflight answered, read the JSON, and draw
  the image.
* OHIF Viewer 3, as viewer developers run it (the prebuilt ``dist/`` of the npm package
  ``@ohif/app``, fetched by scripts/install-test-deps.sh), with its DICOMweb data source
  on the facade, over the embedded archive and over Orthanc: the study list, a study
  opened from it, series metadata and every frame asked with ``transfer-syntax=*``
  (one slice stored as RLE, one as JPEG 2000), decoded by the viewer to exactly the
  stored values and drawn in the viewport; over Orthanc, the viewer opened again costs
  the archive no metadata or frame request (the facade's cache).
* OHIF takes a bearer token from the URL only on its viewer routes, so the study list
  runs on an open facade (loopback, no credentials: the documented default) and the
  viewer alone also on one that requires the token.
"""

from __future__ import annotations

import json
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from gateway.codecs.convert import transcode
from tests.support.archiveproxy import ArchiveProxy
from tests.support.daemon import Gateway
from tests.support.ohif import ohif_dist
from tests.support.orthanc import Orthanc
from tests.support.staticsite import StaticSite
from tests.support.synth import ct_series

TOKEN = "browser-token"

CORS_PAGE = """<!doctype html><html><body><img id="rendered" alt="rendered">
<script>
async function run(facade, token, study, series, instance) {
  const auth = {Authorization: "Bearer " + token};
  const qido = await fetch(facade + "/studies?StudyInstanceUID=" + study,
                           {headers: {...auth, Accept: "application/dicom+json"}});
  const studies = await qido.json();
  const png = await fetch(facade + "/studies/" + study + "/series/" + series + "/instances/" + instance + "/rendered",
                          {headers: {...auth, Accept: "image/png"}});
  const blob = await png.blob();
  const img = document.getElementById("rendered");
  await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; img.src = URL.createObjectURL(blob); });
  return {qidoStatus: qido.status, studies: studies, pngStatus: png.status, pngType: blob.type,
          width: img.naturalWidth, height: img.naturalHeight};
}
async function unauthenticated(facade) {
  return (await fetch(facade + "/studies")).status;
}
async function refused(facade) {
  try { await fetch(facade + "/studies", {headers: {Authorization: "Bearer x"}}); return "fetched"; }
  catch (e) { return e.name; }
}
</script></body></html>"""


@pytest.fixture
def ohif() -> Path:
    """OHIF's prebuilt ``dist/``, as the install script left it."""
    dist = ohif_dist()
    assert (dist / "index.html").is_file(), f"{dist} is missing: run scripts/install-test-deps.sh"
    return dist


def _store_ct(gw: Gateway) -> pydicom.Dataset:
    """CT_small in a fresh study, stored through the facade's STOW-RS."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    client = DICOMwebClient(f"{gw.web_url}/dicom-web", headers={"Authorization": f"Bearer {TOKEN}"})
    assert len(client.store_instances(datasets=[ds]).ReferencedSOPSequence) == 1
    gw.wait_counts(delivered=1)
    return ds


def test_page_from_another_origin_searches_and_draws_a_rendered_png(tmp_path: Path, browser: Any) -> None:
    site = StaticSite(pages={"/index.html": CORS_PAGE}).start()
    other = StaticSite(pages={"/index.html": CORS_PAGE}).start()  # an origin the gateway does not list
    gw = Gateway(tmp_path / "gw", http={"cors_origins": [site.origin]}, http_auth={"bearer_tokens": [TOKEN]})
    try:
        gw.start()
        ds = _store_ct(gw)
        facade = f"{gw.web_url}/dicom-web"
        page = browser.new_page()
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        preflights: list[dict[str, Any]] = []
        cdp.on("Network.requestWillBeSent", lambda e: preflights.append(e) if e["request"]["method"] == "OPTIONS" else None)
        page.goto(f"{site.origin}/index.html")
        got = page.evaluate(
            "([f, t, s, se, i]) => run(f, t, s, se, i)",
            [facade, TOKEN, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID],
        )
        assert got["qidoStatus"] == 200, got
        assert [s["0020000D"]["Value"][0] for s in got["studies"]] == [ds.StudyInstanceUID]
        assert got["pngStatus"] == 200 and got["pngType"] == "image/png"
        assert (got["width"], got["height"]) == (ds.Columns, ds.Rows)
        assert page.evaluate("document.getElementById('rendered').complete && document.getElementById('rendered').naturalWidth") > 0
        # the Authorization header made both fetches preflighted, and each preflight was answered
        assert {e["request"]["url"].split("?")[0].rsplit("/", 1)[-1] for e in preflights} >= {"studies", "rendered"}, json.dumps(preflights)[:2000]

        # a 401 carries the CORS headers too, so the page can tell "log in" from "unreachable"
        assert page.evaluate("(f) => unauthenticated(f)", facade) == 401
        # the same page from an origin the gateway does not list: the browser refuses the answer
        page.goto(f"{other.origin}/index.html")
        assert page.evaluate("(f) => refused(f)", facade) == "TypeError"
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()
        other.stop()


def _ohif_config(facade: str) -> str:
    """OHIF's ``app-config.js``: one DICOMweb data source, the facade, asked as a full
    DICOMweb service (QIDO with includefield and fuzzy matching; WADO-RS metadata and
    frames, thumbnails from frames too; series metadata only when a series is shown)."""
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "defaultDataSourceName": "gateway",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "gateway",
                "configuration": {
                    "friendlyName": "dicom-gateway",
                    "name": "gateway",
                    "qidoRoot": facade,
                    "wadoRoot": facade,
                    "wadoUriRoot": facade,
                    "qidoSupportsIncludeField": True,
                    "supportsFuzzyMatching": True,
                    "supportsWildcard": True,
                    "supportsReject": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "staticWado": False,
                    "singlepart": "bulkdata,video",
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                },
            }
        ],
    }
    return f"window.config = {json.dumps(config, indent=1)};\n"


def _viewer_study(directory: Path) -> list[pydicom.Dataset]:
    """Six 256x256 CT slices of one series, the fourth stored as RLE and the fifth as
    JPEG 2000 lossless, so OHIF's ``transfer-syntax=*`` frames come in three syntaxes."""
    datasets = [pydicom.dcmread(p) for p in ct_series(directory, 6, rows=256, columns=256)]
    for ds in datasets:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 1
        ds.StudyDescription = "OHIF facade"
        ds.SeriesDescription = "CT three syntaxes"
    datasets[3] = transcode(datasets[3], RLELossless)
    datasets[4] = transcode(datasets[4], JPEG2000Lossless)
    return datasets


# What OHIF decoded, per SOP Instance UID: cornerstone's cached images of the viewport's stack.
DECODED_JS = """() => {
  const cs = window.cornerstone;
  const engine = cs && cs.getRenderingEngines()[0];
  const viewport = engine && engine.getViewports()[0];
  if (!viewport || !viewport.getImageIds().length) return null;
  const out = {};
  for (const id of viewport.getImageIds()) {
    const image = cs.cache.getImage(id);
    if (!image) return null;
    const data = image.voxelManager ? image.voxelManager.getScalarData() : image.getPixelData();
    out[id.split("/instances/")[1].split("/")[0]] = Array.from(data);
  }
  return out;
}"""
CURRENT_INDEX_JS = "() => window.cornerstone.getRenderingEngines()[0].getViewports()[0].getCurrentImageIdIndex()"


def _assert_decoded_as_stored(page: Any, datasets: list[pydicom.Dataset]) -> None:
    """Each slice the viewer decoded equals the stored values (CT rescale applied)."""
    decoded = page.evaluate(DECODED_JS)
    assert set(decoded) == {ds.SOPInstanceUID for ds in datasets}
    for ds in datasets:
        expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        got = np.array(decoded[ds.SOPInstanceUID], dtype=np.int32).reshape(ds.Rows, ds.Columns)
        assert np.array_equal(got, expected), ds.file_meta.TransferSyntaxUID


def _viewport_shot(page: Any, path: Path) -> np.ndarray:
    """A screenshot of the viewport, kept in ``path``, as a grey-level array."""
    page.locator(".cornerstone-viewport-element").first.screenshot(path=str(path))
    return np.asarray(Image.open(BytesIO(path.read_bytes())).convert("L"), dtype=np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("upstream", ["local", "orthanc"])
def test_ohif_viewer_lists_opens_and_draws_a_study(tmp_path: Path, browser: Any, ohif: Path, upstream: str) -> None:
    datasets = _viewer_study(tmp_path / "ct")
    study, series = datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID
    site = StaticSite(ohif, spa=True)
    orthanc = Orthanc(workdir=tmp_path / "orthanc") if upstream == "orthanc" else None
    # Orthanc behind a proxy that counts what reaches it
    proxy = ArchiveProxy(orthanc.dicomweb_url) if orthanc is not None else None
    gw = Gateway(tmp_path / "gw", upstream_url=proxy.url if proxy else None, http={"cors_origins": [site.origin]})
    try:
        facade = f"{gw.web_url}/dicom-web"
        if orthanc is not None and proxy is not None:
            orthanc.start()
            proxy.start()
            files = [tmp_path / "ct" / f"stored{n}.dcm" for n in range(len(datasets))]
            for ds, path in zip(datasets, files, strict=True):
                ds.save_as(path, enforce_file_format=True)
            orthanc.upload(files)
            gw.start()
        else:
            gw.start()
            client = DICOMwebClient(facade)
            assert len(client.store_instances(datasets=datasets).ReferencedSOPSequence) == len(datasets)
            gw.wait_counts(delivered=len(datasets))
        site.pages["/app-config.js"] = _ohif_config(facade)
        site.start()

        page = browser.new_page(viewport={"width": 1280, "height": 900})
        responses: list[Any] = []
        page.on("response", lambda r: responses.append(r) if r.url.startswith(facade) else None)
        page.goto(f"{site.origin}/")
        page.get_by_text("OHIF facade").first.click(timeout=30_000)  # the study list's row
        page.get_by_role("button", name="Basic Viewer").first.click(timeout=10_000)
        page.wait_for_url(f"**/viewer?StudyInstanceUIDs={study}*", timeout=30_000)
        page.wait_for_function(f"({DECODED_JS})() !== null", timeout=60_000)

        _assert_decoded_as_stored(page, datasets)

        for label in ("Skip all", "Confirm and hide"):  # the first-run tour and the notice over the viewport
            button = page.get_by_role("button", name=label)
            if button.count():
                button.first.click()
        # scroll with the mouse wheel to the RLE and the JPEG 2000 slices: each is drawn
        box = page.locator(".cornerstone-viewport-element").first.bounding_box()
        assert box is not None
        page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
        order = [url.split("/instances/")[1].split("/")[0] for url in page.evaluate(
            "() => window.cornerstone.getRenderingEngines()[0].getViewports()[0].getImageIds()")]
        shots = {}
        for index in range(len(order)):
            deadline = time.monotonic() + 10
            while page.evaluate(CURRENT_INDEX_JS) < index:
                assert time.monotonic() < deadline, f"the wheel did not reach slice {index + 1}"
                page.mouse.wheel(0, 120)
                page.wait_for_timeout(200)
            page.wait_for_timeout(300)
            shots[order[index]] = _viewport_shot(page, tmp_path / f"viewport-{index + 1}.png")
        for ds in datasets:
            shot = shots[ds.SOPInstanceUID]
            # a drawn slice: the bright blob in the middle, dark corners, noise throughout
            assert shot.std() > 20, ds.file_meta.TransferSyntaxUID
            middle = shot[shot.shape[0] // 3: 2 * shot.shape[0] // 3, shot.shape[1] // 3: 2 * shot.shape[1] // 3]
            assert middle.mean() > shot.mean() + 10, ds.file_meta.TransferSyntaxUID

        # what OHIF asked the facade, and that every answer was a success
        # path, status, Accept, Content-Type of each facade answer
        answers = [(r.url[len(facade):], r.status, r.request.headers.get("accept", ""), r.headers.get("content-type", "")) for r in responses]
        assert answers and all(status == 200 for _, status, _, _ in answers), [a for a in answers if a[1] != 200]
        metadata = [a for a in answers if a[0] == f"/studies/{study}/series/{series}/metadata"]
        assert metadata and "application/dicom+json" in metadata[0][2]
        frames = [a for a in answers if "/frames/" in a[0]]
        assert {path.split("/instances/")[1].split("/")[0] for path, _, _, _ in frames} == {ds.SOPInstanceUID for ds in datasets}
        assert all("transfer-syntax=*" in accept and content.startswith("multipart/related") for _, _, accept, content in frames)
        # each frame as stored, its part header spelled as OHIF reads it
        syntax = {ds.SOPInstanceUID: ds.file_meta.TransferSyntaxUID for ds in datasets}
        for response in responses:
            if "/frames/" in response.url:
                sop = response.url.split("/instances/")[1].split("/")[0]
                head = response.body()[:400]
                assert b"\r\nContent-Type: " in head and f"transfer-syntax={syntax[sop]}".encode() in head, head
        assert any(path.startswith("/studies?") for path, _, _, _ in answers)  # the study list's search

        if proxy is not None:
            # the viewer opened again: metadata and frames come from the facade's cache
            # (or the browser's), none from the archive
            asked = [p for p in proxy.requests if "/frames/" in p or p.endswith("/metadata")]
            assert sum("/frames/" in p for p in asked) == len(datasets)
            served = len(responses)
            page.reload()
            page.wait_for_function(f"({DECODED_JS})() !== null", timeout=60_000)
            assert any(r.url.endswith(f"/series/{series}/metadata") for r in responses[served:])  # asked the facade again
            assert [p for p in proxy.requests if "/frames/" in p or p.endswith("/metadata")] == asked
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()
        if proxy is not None:
            proxy.stop()
        if orthanc is not None:
            orthanc.cleanup()


@pytest.mark.slow
def test_ohif_viewer_given_a_bearer_token_draws_a_study(tmp_path: Path, browser: Any, ohif: Path) -> None:
    """OHIF's viewer route takes ``?token=`` and sends it as ``Authorization: Bearer`` on
    every DICOMweb request: each is preflighted from the viewer's origin and admitted."""
    datasets = _viewer_study(tmp_path / "ct")
    study = datasets[0].StudyInstanceUID
    site = StaticSite(ohif, spa=True)
    gw = Gateway(tmp_path / "gw", http={"cors_origins": [site.origin]}, http_auth={"bearer_tokens": [TOKEN]})
    try:
        gw.start()
        facade = f"{gw.web_url}/dicom-web"
        client = DICOMwebClient(facade, headers={"Authorization": f"Bearer {TOKEN}"})
        assert len(client.store_instances(datasets=datasets).ReferencedSOPSequence) == len(datasets)
        gw.wait_counts(delivered=len(datasets))
        site.pages["/app-config.js"] = _ohif_config(facade)
        site.start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        answers: list[tuple[str, int, str]] = []
        page.on("response", lambda r: answers.append(
            (r.url[len(facade):], r.status, r.request.headers.get("authorization", ""))
        ) if r.url.startswith(facade) else None)
        page.goto(f"{site.origin}/viewer?StudyInstanceUIDs={study}&token={TOKEN}")
        page.wait_for_function(f"({DECODED_JS})() !== null", timeout=60_000)
        _assert_decoded_as_stored(page, datasets)
        assert sum("/frames/" in path for path, _, _ in answers) >= len(datasets)
        assert all(status == 200 and auth == f"Bearer {TOKEN}" for _, status, auth in answers), answers
        # The refusal's own log line, not the digits: a random UID may hold "401".
        assert "no valid credentials" not in gw.log() and "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()


PDF_SHOWN_JS = """() => { const o = document.querySelector("object[type='application/pdf']"); return !!(o && o.data); }"""
PDF_JS = """async () => {
  const o = document.querySelector("object[type='application/pdf']");
  if (!o || !o.data) return null;
  const bytes = new Uint8Array(await (await fetch(o.data)).arrayBuffer());
  return Array.from(bytes.slice(0, 8)).concat([bytes.length]);
}"""


@pytest.mark.slow
def test_ohif_viewer_shows_an_encapsulated_pdf(tmp_path: Path, browser: Any, ohif: Path) -> None:
    """A 300 KB PDF report: its Encapsulated Document is bulk data in the metadata, which
    OHIF's PDF viewport fetches from the facade's bulkdata resource."""
    pdf = b"%PDF-1.4\n%" + b"x" * 300_000 + b"\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    pdf += b"\0" * (len(pdf) % 2)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.StudyDescription, ds.Modality = "PDF1", "Report^Pdf", "OHIF pdf", "DOC"
    ds.SeriesNumber, ds.InstanceNumber, ds.MIMETypeOfEncapsulatedDocument = 1, 1, "application/pdf"
    ds.EncapsulatedDocument = pdf
    ds.save_as(tmp_path / "report.dcm", enforce_file_format=True)  # File Meta completed, as a file has it
    ds = pydicom.dcmread(tmp_path / "report.dcm")
    site = StaticSite(ohif, spa=True)
    gw = Gateway(tmp_path / "gw", http={"cors_origins": [site.origin]})
    try:
        gw.start()
        facade = f"{gw.web_url}/dicom-web"
        assert len(DICOMwebClient(facade).store_instances(datasets=[ds]).ReferencedSOPSequence) == 1
        gw.wait_counts(delivered=1)
        site.pages["/app-config.js"] = _ohif_config(facade)
        site.start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        bulk: list[int] = []
        page.on("response", lambda r: bulk.append(r.status) if "/bulkdata/" in r.url else None)
        page.goto(f"{site.origin}/viewer?StudyInstanceUIDs={ds.StudyInstanceUID}")
        page.wait_for_function(PDF_SHOWN_JS, timeout=60_000)
        shown = page.evaluate(PDF_JS)
        assert bytes(shown[:8]) == pdf[:8] and shown[8] in (len(pdf), len(pdf.rstrip(b"\0")))
        assert bulk == [200]  # the document came by the facade's bulkdata resource
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()


def _segmentation_of(cts: list[pydicom.Dataset]) -> pydicom.Dataset:
    """A binary SEG (highdicom) of ``cts``: one segment, a square in the middle of each
    slice, as an AI model's answer routed back to the archive would be."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rows, columns = cts[0].Rows, cts[0].Columns
    mask = np.zeros((len(cts), rows, columns), dtype=bool)
    mask[:, rows * 3 // 8: rows * 5 // 8, columns * 3 // 8: columns * 5 // 8] = True
    segment = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion", segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    return hd.seg.Segmentation(
        source_images=cts, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment], series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="dicom-gateway tests", manufacturer_model_name="square",
        software_versions="1", device_serial_number="1",
    )


@pytest.mark.slow
def test_ohif_viewer_overlays_a_segmentation(tmp_path: Path, browser: Any, ohif: Path) -> None:
    """A CT series and a binary SEG of it (1-bit pixel data, three frames): OHIF loads
    the SEG through the facade and draws its segment over the slice."""
    cts = _viewer_study(tmp_path / "ct")[:3]
    frame_of_reference = generate_uid()
    for ds in cts:  # what highdicom wants of its source images
        ds.FrameOfReferenceUID, ds.PatientOrientation = frame_of_reference, ""
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.AccessionNumber = "", "", "1", ""
        ds.ReferringPhysicianName, ds.StudyDate, ds.StudyTime = "", "20260101", "120000"
    seg = _segmentation_of(cts)
    site = StaticSite(ohif, spa=True)
    gw = Gateway(tmp_path / "gw", http={"cors_origins": [site.origin]})
    try:
        gw.start()
        facade = f"{gw.web_url}/dicom-web"
        assert len(DICOMwebClient(facade).store_instances(datasets=[*cts, seg]).ReferencedSOPSequence) == 4
        gw.wait_counts(delivered=4)
        site.pages["/app-config.js"] = _ohif_config(facade)
        site.start()
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        statuses: list[int] = []
        page.on("response", lambda r: statuses.append(r.status) if r.url.startswith(facade) else None)
        page.goto(f"{site.origin}/viewer?StudyInstanceUIDs={cts[0].StudyInstanceUID}")
        page.wait_for_function(f"({DECODED_JS})() !== null", timeout=60_000)
        for label in ("Skip all", "Confirm and hide"):
            button = page.get_by_role("button", name=label)
            if button.count():
                button.first.click()
        page.get_by_text("SEG", exact=True).last.dblclick(force=True)  # the SEG series in the study browser
        page.get_by_role("button", name="Yes").click(timeout=30_000)  # "Do you want to open this Segmentation?"
        from playwright.sync_api import Error as PlaywrightError  # (imported where the browser is, as the fixture does)

        deadline = time.monotonic() + 30
        while True:
            try:
                page.locator(".cornerstone-viewport-element").first.screenshot(path=str(tmp_path / "seg.png"), timeout=5_000)
            except PlaywrightError as exc:  # OHIF replaced the viewport as it loaded the SEG: look again
                assert time.monotonic() < deadline, f"no viewport to look at: {exc}"
                page.wait_for_timeout(500)
                continue
            shot = np.asarray(Image.open(tmp_path / "seg.png").convert("RGB"), dtype=np.float64)
            h, w = shot.shape[:2]
            middle = shot[h * 9 // 20: h * 11 // 20, w * 9 // 20: w * 11 // 20]
            beside = shot[h * 9 // 20: h * 11 // 20, w * 2 // 10: w * 3 // 10]  # the slice, left of the segment
            red = (middle[..., 0] - middle[..., 1]).mean()
            if red > 30:
                break
            assert time.monotonic() < deadline, f"no segment drawn (red excess {red:.1f})"
            page.wait_for_timeout(500)
        assert abs((beside[..., 0] - beside[..., 1]).mean()) < 5  # grey where there is no segment
        assert statuses and all(status == 200 for status in statuses), statuses
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()
