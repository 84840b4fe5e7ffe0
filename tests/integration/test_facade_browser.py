"""A real browser against the facade: headless Chromium (Debian's ``chromium``, driven by
Playwright for Python) loading pages from another origin, as a viewer deployed apart
from the gateway does.

* A plain page fetches a QIDO-RS search and a rendered PNG with an ``Authorization``
  header: the browser must get its CORS preflight answered, read the JSON, and draw
  the image.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from playwright.sync_api import sync_playwright
from pydicom.uid import generate_uid

from tests.support.daemon import Gateway
from tests.support.staticsite import StaticSite

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by scripts/install-test-deps.sh
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
async function refused(facade) {
  try { await fetch(facade + "/studies", {headers: {Authorization: "Bearer x"}}); return "fetched"; }
  catch (e) { return e.name; }
}
</script></body></html>"""


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


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

        # the same page from an origin the gateway does not list: the browser refuses the answer
        page.goto(f"{other.origin}/index.html")
        assert page.evaluate("(f) => refused(f)", facade) == "TypeError"
        assert "Traceback" not in gw.log()
    finally:
        gw.kill()
        site.stop()
        other.stop()
