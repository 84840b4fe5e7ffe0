"""gzip on the facade's JSON answers, as curl and a browser ask for it: a study's
metadata and a QIDO-RS answer arrive gzip-encoded and decode to the very bytes sent
plain, the weak ETag revalidates to 304, clients that do not ask get plain bytes, and
``http.compress = false`` turns it off."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pydicom

from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.synth import ct_series


def test_metadata_and_searches_are_gzipped_for_clients_that_ask(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = gateway()
    files = ct_series(tmp_path / "ct", 40, rows=16, columns=16)
    assert dcmtk.storescu(gw.port, files, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=40)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    url = f"{gw.web_url}/dicom-web/studies"

    plain = curl(f"{url}/{study}/metadata")
    packed = curl("--header", "Accept-Encoding: gzip, deflate, br", f"{url}/{study}/metadata")
    assert plain.status == packed.status == 200
    assert "content-encoding" not in plain.headers and packed.headers["content-encoding"] == "gzip"
    assert gzip.decompress(packed.body) == plain.body and len(json.loads(plain.body)) == 40
    assert len(packed.body) * 8 < len(plain.body), (len(packed.body), len(plain.body))
    assert packed.headers["etag"] == "W/" + plain.headers["etag"]
    assert "Accept-Encoding" in packed.headers["vary"] and "Accept" in packed.headers["vary"]
    again = curl("--header", "Accept-Encoding: gzip", "--header", f"If-None-Match: {packed.headers['etag']}", f"{url}/{study}/metadata")
    assert again.status == 304 and again.headers["etag"] == packed.headers["etag"]

    found = curl("--compressed", f"{url}/{study}/instances?includefield=all")  # curl decodes it
    assert found.status == 200 and found.headers["content-encoding"] == "gzip" and len(found.json()) == 40
    refused = curl("--header", "Accept-Encoding: gzip;q=0, identity", f"{url}/{study}/metadata")
    assert "content-encoding" not in refused.headers and refused.body == plain.body


def test_compression_can_be_turned_off(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = gateway(http={"compress": False})
    files = ct_series(tmp_path / "ct", 12, rows=16, columns=16)
    assert dcmtk.storescu(gw.port, files, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=12)
    r = curl("--header", "Accept-Encoding: gzip", f"{gw.web_url}/dicom-web/studies/{pydicom.dcmread(files[0]).StudyInstanceUID}/metadata")
    assert r.status == 200 and "content-encoding" not in r.headers and len(r.json()) == 12
    assert "Accept-Encoding" not in r.headers.get("vary", "")
