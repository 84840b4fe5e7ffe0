"""The vendors' curl examples, run as written against the facade, over the embedded
archive and over a real Orthanc (DICOMweb) upstream.

* The Azure DICOM service tour (seeds/002) under ``/v1`` with a bearer token: STOW
  (multipart built by ``curl --form`` with the Content-Type overridden, to a study,
  single-part), the PUT upserts, WADO study/series/instance/metadata/frames, QIDO at
  every level, DELETE. Only the host and token are substituted; the one typo of the
  stored copy (``studies1.2...``, a lost slash) is restored as the vendor wrote it.
* The SIIM 5-minute guide (seeds/003) with an ``apikey`` header under ``/dicomweb``:
  QIDO by tag number, JSON and XML answers, WADO-RS instance as ``application/dicom``,
  rendered JPEG/PNG frames, and WADO-URI (DICOM, JPEG, PNG).
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from gateway.codecs.description import PixelDescription
from gateway.codecs.render import render_frame, window_from_dataset
from tests.support import dcmtk
from tests.support.curl import CURL, curl
from tests.support.fixtures import gateway_over
from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc
from tests.support.synth import ct_series

REPO = Path(__file__).resolve().parents[2]
# The project's shared/ folder lies beside the repository (CI lays a copy there too).
SAMPLES = next((d for d in (REPO.parent / "shared" / "samples", Path("/work/shared/samples")) if d.is_dir()), REPO / "missing")
STUDY = "1.2.826.0.1.3680043.8.498.13230779778012324449356534479549187420"
SERIES = "1.2.826.0.1.3680043.8.498.45787841905473114233124723359129632652"
SERIES_BLUE = "1.2.826.0.1.3680043.8.498.77033797676425927098669402985243398207"
RED = "1.2.826.0.1.3680043.8.498.47359123102728459884412887463296905395"
GREEN = "1.2.826.0.1.3680043.8.498.12714725698140337137334606354172323212"
BLUE = "1.2.826.0.1.3680043.8.498.13273713909719068980354078852867170114"
TOKEN = "tour-token"
APIKEY = "siim-key"
NATIVE = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"  # PS3.19 A.1's namespace

pytestmark = pytest.mark.skipif(not SAMPLES.is_dir(), reason="the Azure tour's sample files are not on this machine")


@pytest.fixture(params=["local", "orthanc"])
def facade(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Orthanc | None]]:
    """A gateway with a bearer token and an API key, over the embedded archive or Orthanc."""
    with gateway_over(
        request.param, tmp_path, http={"base_path": "/dicomweb"}, http_auth={"bearer_tokens": [TOKEN], "api_keys": [APIKEY]}
    ) as pair:
        yield pair


def _uids(answer: dict) -> list[str]:
    return [item["00081155"]["Value"][0] for item in answer.get("00081199", {}).get("Value", [])]


@pytest.mark.slow
def test_azure_tour_runs_as_written(facade: tuple[Gateway, Orthanc | None]) -> None:
    gw, orthanc = facade
    url = f"{gw.web_url}/v1"
    auth = ("--header", f"Authorization: Bearer {TOKEN}")
    multipart = ("--header", "Accept: application/dicom+json", "--header", 'Content-Type: multipart/related; type="application/dicom"')

    # STOW: multipart (curl --form, Content-Type overridden), to the study, single part
    r = curl("--location", "--request", "POST", f"{url}/studies", *multipart, *auth,
             "--form", f"file1=@{SAMPLES}/red-triangle.dcm;type=application/dicom")
    assert r.status == 200, r.body
    assert _uids(r.json()) == [RED]
    r = curl("--request", "POST", f"{url}/studies/{STUDY}", *multipart, *auth,
             "--form", f"file1=@{SAMPLES}/blue-circle.dcm;type=application/dicom")
    assert r.status == 200 and _uids(r.json()) == [BLUE], r.body
    r = curl("--location", "--request", "POST", f"{url}/studies", "--header", "Accept: application/dicom+json",
             "--header", "Content-Type: application/dicom", *auth, "--data-binary", f"@{SAMPLES}/green-square.dcm")
    assert r.status == 200 and _uids(r.json()) == [GREEN], r.body
    retrieve_url = r.json()["00081199"]["Value"][0]["00081190"]["Value"][0]
    assert retrieve_url == f"{url}/studies/{STUDY}/series/{SERIES}/instances/{GREEN}"
    # the PUT upserts (non-standard): the same three forms
    r = curl("--location", "--request", "PUT", f"{url}/studies", *multipart, *auth,
             "--form", f"file1=@{SAMPLES}/red-triangle.dcm;type=application/dicom")
    assert r.status == 200 and _uids(r.json()) == [RED], r.body
    r = curl("--request", "PUT", f"{url}/studies/{STUDY}", *multipart, *auth,
             "--form", f"file1=@{SAMPLES}/blue-circle.dcm;type=application/dicom")
    assert r.status == 200 and _uids(r.json()) == [BLUE], r.body
    r = curl("--location", "--request", "PUT", f"{url}/studies", "--header", "Accept: application/dicom+json",
             "--header", "Content-Type: application/dicom", *auth, "--data-binary", f"@{SAMPLES}/green-square.dcm")
    assert r.status == 200 and _uids(r.json()) == [GREEN], r.body
    gw.wait_counts(delivered=6)
    if orthanc is not None:
        assert orthanc.sop_instance_uids() == {RED, GREEN, BLUE}

    # WADO-RS: study, metadata, series, instance, frames
    accept_any = ("--header", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*')
    r = curl("--request", "GET", f"{url}/studies/{STUDY}", *accept_any, *auth)
    assert r.status == 200
    parts = r.parts()
    originals = {n: pydicom.dcmread(SAMPLES / f"{n}.dcm") for n in ("red-triangle", "green-square", "blue-circle")}
    got = {pydicom.dcmread(BytesIO(body)).SOPInstanceUID: pydicom.dcmread(BytesIO(body)) for _, body in parts}
    assert set(got) == {RED, GREEN, BLUE}
    for ds in originals.values():
        assert got[ds.SOPInstanceUID].PixelData == ds.PixelData
    r = curl("--request", "GET", f"{url}/studies/{STUDY}/metadata", "--header", "Accept: application/dicom+json", *auth)
    assert r.status == 200 and r.content_type.startswith("application/dicom+json")
    assert {o["00080018"]["Value"][0] for o in r.json()} == {RED, GREEN, BLUE}
    r = curl("--request", "GET", f"{url}/studies/{STUDY}/series/{SERIES}", *accept_any, *auth)
    assert r.status == 200 and {pydicom.dcmread(BytesIO(b)).SOPInstanceUID for _, b in r.parts()} == {RED, GREEN}
    r = curl("--request", "GET", f"{url}/studies/{STUDY}/series/{SERIES}/metadata", "--header", "Accept: application/dicom+json", *auth)
    assert r.status == 200 and {o["00080018"]["Value"][0] for o in r.json()} == {RED, GREEN}
    instance = f"{url}/studies/{STUDY}/series/{SERIES}/instances/{RED}"
    r = curl("--request", "GET", instance, "--header", "Accept: application/dicom; transfer-syntax=*", *auth)
    assert r.status == 200 and r.content_type.startswith("application/dicom")
    assert pydicom.dcmread(BytesIO(r.body)).PixelData == originals["red-triangle"].PixelData
    r = curl("--request", "GET", f"{instance}/metadata", "--header", "Accept: application/dicom+json", *auth)
    assert r.status == 200 and r.json()[0]["00080018"]["Value"][0] == RED
    r = curl("--request", "GET", f"{instance}/frames/1", "--header",
             'Accept: multipart/related; type="application/octet-stream"; transfer-syntax=1.2.840.10008.1.2.1', *auth)
    assert r.status == 200
    (headers, frame), = r.parts()
    assert headers["content-type"].startswith("application/octet-stream")
    size = 979 * 985 * 3
    assert len(frame) in (size, size + 1) and frame[:size] == originals["red-triangle"].PixelData[:size]

    # QIDO-RS at every level
    json_accept = ("--header", "Accept: application/dicom+json")
    for path, uid in [
        (f"studies?StudyInstanceUID={STUDY}", STUDY),
        (f"series?SeriesInstanceUID={SERIES}", SERIES),
        (f"studies/{STUDY}/series?SeriesInstanceUID={SERIES}", SERIES),
        (f"instances?SOPInstanceUID={RED}", RED),
        (f"studies/{STUDY}/instances?SOPInstanceUID={RED}", RED),
        (f"studies/{STUDY}/series/{SERIES}/instances?SOPInstanceUID={RED}", RED),
    ]:
        r = curl("--request", "GET", f"{url}/{path}", *json_accept, *auth)
        assert r.status == 200, (path, r.body)
        answers = r.json()
        tag = {STUDY: "0020000D", SERIES: "0020000E", RED: "00080018"}[uid]
        assert [a[tag]["Value"][0] for a in answers] == [uid], path

    # DELETE (non-standard): the embedded archive deletes; Orthanc has no DICOMweb DELETE
    r = curl("--request", "DELETE", instance, *auth)
    if orthanc is None:
        assert r.status == 204
        r = curl("--request", "GET", f"{url}/studies/{STUDY}/instances", *json_accept, *auth)
        assert {a["00080018"]["Value"][0] for a in r.json()} == {GREEN, BLUE}
        assert curl("--request", "DELETE", f"{url}/studies/{STUDY}/series/{SERIES}", *auth).status == 204
        assert curl("--request", "DELETE", f"{url}/studies/{STUDY}", *auth).status == 204
        r = curl("--request", "GET", f"{url}/studies?StudyInstanceUID={STUDY}", *json_accept, *auth)
        assert r.json() == []
    else:
        assert r.status == 501 and b"does not support" in r.body
        assert orthanc.sop_instance_uids() == {RED, GREEN, BLUE}


def _siim_instance(directory: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientName = "SIIM^Hackathon"
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(directory / "siim.dcm", enforce_file_format=True)
    return ds


@pytest.mark.slow
def test_siim_guide_steps_with_an_apikey(facade: tuple[Gateway, Orthanc | None], tmp_path: Path) -> None:
    gw, _ = facade
    url = f"{gw.web_url}/dicomweb"
    key = ("--header", f"apikey: {APIKEY}")
    ds = _siim_instance(tmp_path)
    r = curl("-X", "POST", f"{url}/studies", "--header", "Content-Type: application/dicom", *key,
             "--data-binary", f"@{tmp_path / 'siim.dcm'}")
    assert r.status == 200, r.body
    gw.wait_counts(delivered=1)

    # 1. Hello world: studies of patients named SIIM*, by tag number (trailing slash as written)
    r = curl(f"{url}/studies/?00100010=SIIM*", *key)
    assert r.status == 200
    assert [s["0020000D"]["Value"][0] for s in r.json()] == [ds.StudyInstanceUID]
    assert curl(f"{url}/studies/?00100010=NOBODY*", *key).json() == []
    r = curl(f"{url}/studies?PatientName=siim*&fuzzymatching=true&includefield=all", *key)
    assert [s["0020000D"]["Value"][0] for s in r.json()] == [ds.StudyInstanceUID]  # PN matching ignores case
    # 2. the study's structure
    r = curl(f"{url}/studies/{ds.StudyInstanceUID}/instances", *key)
    assert [i["00080018"]["Value"][0] for i in r.json()] == [ds.SOPInstanceUID]
    # 3. JSON or XML (multipart)
    r = curl(f"{url}/studies/{ds.StudyInstanceUID}/instances", *key, "--header", "Accept: application/json")
    assert r.status == 200 and r.json()[0]["00080018"]["Value"][0] == ds.SOPInstanceUID
    r = curl(f"{url}/studies/?00100010=SIIM*", *key, "--header", "Accept: text/xml")
    assert r.status == 200 and r.content_type.startswith("multipart/related")
    (headers, document), = r.parts()
    assert headers["content-type"] == "application/dicom+xml"
    root = ET.fromstring(document)
    assert root.tag == f"{NATIVE}NativeDicomModel"
    names = root.findall(f".//{NATIVE}DicomAttribute[@keyword='PatientName']/{NATIVE}PersonName/{NATIVE}Alphabetic/{NATIVE}FamilyName")
    assert [n.text for n in names] == ["SIIM"]
    # 4. the instance as application/dicom
    r = curl(f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}",
             *key, "--header", "Accept: application/dicom")
    assert r.status == 200
    assert pydicom.dcmread(BytesIO(r.body)).pixel_array.tolist() == ds.pixel_array.tolist()
    # 5. rendered JPEG / PNG of frame 1, windowed as the instance says
    instance = f"{url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    r = curl(f"{instance}/frames/1/rendered", *key, "--header", "Accept: image/jpeg")
    assert r.status == 200 and r.content_type == "image/jpeg" and r.body.startswith(b"\xff\xd8")
    r = curl(f"{instance}/frames/1/rendered", *key, "--header", "Accept: image/png")
    assert r.status == 200 and r.content_type == "image/png"
    png = np.asarray(Image.open(BytesIO(r.body)))
    expected = render_frame(ds.pixel_array, PixelDescription.from_dataset(ds), "png", window_from_dataset(ds))
    assert np.array_equal(png, np.asarray(Image.open(BytesIO(expected))))
    assert np.corrcoef(png.ravel().astype(float), ds.pixel_array.ravel().astype(float))[0, 1] > 0.9
    r = curl(f"{instance}/rendered?viewport=64,64&window=40,400", *key, "--header", "Accept: image/png")
    assert r.status == 200 and Image.open(BytesIO(r.body)).size == (64, 64)
    r = curl(f"{instance}/thumbnail", *key)
    assert r.status == 200 and max(Image.open(BytesIO(r.body)).size) == 128
    r = curl(f"{url}/studies/{ds.StudyInstanceUID}/rendered", *key, "--header", "Accept: image/gif")
    assert r.status == 200 and r.content_type.startswith("multipart/related")  # each instance rendered (PS3.18 10.4.1.1.3)
    assert [body[:4] for _, body in r.parts()] == [b"GIF8"]
    # 6. WADO-URI: DICOM, then JPEG and PNG by contentType (at /wadouri/ and /wado)
    query = f"requestType=WADO&studyUID={ds.StudyInstanceUID}&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
    r = curl(f"{gw.web_url}/wadouri/?{query}", *key)
    assert r.status == 200 and pydicom.dcmread(BytesIO(r.body)).SOPInstanceUID == ds.SOPInstanceUID
    r = curl(f"{gw.web_url}/wadouri/?{query}&contentType=image/jpeg", *key)
    assert r.status == 200 and r.body.startswith(b"\xff\xd8")
    r = curl(f"{gw.web_url}/wado?{query}&contentType=image/png&rows=32&columns=32", *key)
    assert r.status == 200 and Image.open(BytesIO(r.body)).size == (32, 32)
    assert curl(f"{gw.web_url}/wado?{query}", "--header", "apikey: wrong").status == 401


def test_credentials_cors_and_health(gateway) -> None:  # type: ignore[no-untyped-def]
    gw = gateway(
        http={"cors_origins": ["http://viewer.localhost"]},
        http_auth={"bearer_tokens": [TOKEN], "basic_users": {"viewer": "pw"}, "api_keys": [APIKEY]},
    )
    url = f"{gw.web_url}/dicom-web/studies"
    r = curl(url)
    assert r.status == 401
    assert "Bearer" in r.headers["www-authenticate"] and "Basic" in r.headers["www-authenticate"]
    assert curl(url, "--header", "Authorization: Bearer wrong").status == 401
    assert curl(url, "--header", f"Authorization: Bearer {TOKEN}").status == 200
    assert curl(url, "--user", "viewer:pw").status == 200
    assert curl(url, "--user", "viewer:nope").status == 401
    assert curl(url, "--header", f"apikey: {APIKEY}").status == 200
    assert curl(f"{gw.web_url}/healthz").status == 200
    # a browser's preflight carries no credentials and is answered; the answer allows Authorization
    r = curl("-X", "OPTIONS", url, "--header", "Origin: http://viewer.localhost",
             "--header", "Access-Control-Request-Method: GET", "--header", "Access-Control-Request-Headers: authorization")
    assert r.status == 204
    assert r.headers["access-control-allow-origin"] == "http://viewer.localhost"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = curl(url, "--header", "Origin: http://viewer.localhost", "--header", f"Authorization: Bearer {TOKEN}")
    assert r.headers["access-control-allow-origin"] == "http://viewer.localhost"
    r = curl(url, "--header", "Origin: http://evil.localhost", "--header", f"Authorization: Bearer {TOKEN}")
    assert "access-control-allow-origin" not in r.headers
    # the same resources under every root
    for root in ("/v1", "/v1.0-prerelease", "/v2", "/datastore/ds1", "/dicom-web"):
        assert curl(f"{gw.web_url}{root}/studies", "--header", f"Authorization: Bearer {TOKEN}").status == 200, root


def test_an_address_guessing_credentials_is_turned_away_for_a_minute(gateway) -> None:  # type: ignore[no-untyped-def]
    """http.auth.max_failures_per_minute = 3: requests without credentials do not count;
    the third wrong password does, and then even the right token gets 429 with
    Retry-After; the probes stay open."""
    gw = gateway(http_auth={"bearer_tokens": [TOKEN], "basic_users": {"viewer": "pw"}, "max_failures_per_minute": 3})
    url = f"{gw.web_url}/dicom-web/studies"
    assert [curl(url).status for _ in range(5)] == [401] * 5
    assert [curl(url, "--user", f"viewer:pw-try-{n}").status for n in range(3)] == [401] * 3
    r = curl(url, "--header", f"Authorization: Bearer {TOKEN}")
    assert r.status == 429 and 50 <= int(r.headers["retry-after"]) <= 60, r.headers
    assert curl(url).status == 429 and curl(f"{gw.web_url}/healthz").status == 200
    # another address is not affected, and the lockout is counted for the alert
    metrics = curl("--interface", "127.0.0.2", "--header", f"Authorization: Bearer {TOKEN}", f"{gw.web_url}/metrics")
    assert metrics.status == 200 and "gateway_http_auth_lockouts_total 1.0" in metrics.body.decode()
    log = gw.log()
    assert log.count("3 failed authentications within a minute") == 1 and "pw-try" not in log


def test_bad_requests_get_clear_answers(gateway) -> None:  # type: ignore[no-untyped-def]
    gw = gateway()
    url = f"{gw.web_url}/dicom-web"
    r = curl(f"{url}/studies?StudyDate=2020-13-45x")
    assert r.status == 400 and b"StudyDate" in r.body and b"2020" not in r.body
    r = curl(f"{url}/studies?NoSuchKeyword=1")
    assert r.status == 400 and b"NoSuchKeyword" in r.body
    r = curl(f"{url}/studies?SOPInstanceUID=1.2.3")
    assert r.status == 400 and b"SOPInstanceUID" in r.body
    assert curl(f"{url}/studies/not-a-uid/series").status == 400
    assert curl(f"{url}/studies/1.2.3/series/1.2.4/instances/1.2.5", "--header", "Accept: application/dicom").status == 404
    assert curl(f"{url}/studies", "--header", "Accept: image/png").status == 406
    log = gw.log()
    assert "Traceback" not in log


def test_a_read_only_facade_refuses_stores_and_deletions(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """http.read_only: viewers read, nothing is stored or deleted through the facade
    (405 with Allow), while the DIMSE side stores as ever."""
    gw = gateway(http={"read_only": True})
    (instance,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    assert dcmtk.storescu(gw.port, [instance], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1)
    study = pydicom.dcmread(instance).StudyInstanceUID
    url = f"{gw.web_url}/dicom-web/studies"
    assert curl(url).status == 200 and curl(f"{url}/{study}/metadata").status == 200
    r = curl("-X", "POST", "--header", "Content-Type: application/dicom", "--data-binary", f"@{instance}", url)
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD, OPTIONS" and b"read-only" in r.body
    assert curl("-X", "DELETE", f"{url}/{study}").status == 405
    assert curl(f"{url}/{study}/metadata").status == 200  # still there
    assert "405, the facade is read-only" in gw.log()


def _upload(url: str, body: Path, *headers: str) -> tuple[int, list[str], int]:
    """POST ``body`` with ``Expect: 100-continue`` as curl sends a large upload, willing
    to wait 30 s for the interim answer: (final status, the statuses of every answer
    block, the bytes of the body curl sent)."""
    result = subprocess.run(
        [CURL, "-sS", "-o", "/dev/null", "-D", "-", "-w", "%{size_upload}", "--expect100-timeout", "30",
         "-X", "POST", "--header", "Expect: 100-continue", *(a for h in headers for a in ("--header", h)),
         "--data-binary", f"@{body}", url],
        capture_output=True, timeout=60, text=True,
    )
    assert result.returncode == 0, result.stderr
    head, _, sent = result.stdout.rpartition("\n")
    statuses = [line.split()[1] for line in head.splitlines() if line.startswith("HTTP/")]
    return int(statuses[-1]), statuses, int(sent)


def test_an_upload_waiting_for_100_continue_is_refused_before_its_body(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A client that asks ``Expect: 100-continue`` (curl does for any large upload) is
    told 401, 415 or 503 before it sends its body, not after: a viewer with a stale
    token, or anyone at all, must not be able to push an 8 MiB body into the gateway
    before being refused. An admitted upload gets its 100 Continue at once."""
    gw = gateway(http_auth={"bearer_tokens": [TOKEN]})
    url = f"{gw.web_url}/dicom-web/studies"
    (instance,) = ct_series(tmp_path / "ct", 1, rows=2048, columns=2048)  # 8 MiB
    size = instance.stat().st_size
    dicom = "Content-Type: application/dicom"
    assert _upload(url, instance, dicom, "Authorization: Bearer wrong") == (401, ["401"], 0)
    assert _upload(url, instance, dicom) == (401, ["401"], 0)
    assert _upload(url, instance, "Content-Type: text/plain", f"Authorization: Bearer {TOKEN}") == (415, ["415"], 0)
    assert _upload(url, instance, dicom, f"Authorization: Bearer {TOKEN}") == (200, ["100", "200"], size)
    gw.wait_counts(delivered=1)
    log = gw.log()
    assert "Traceback" not in log and "401, no valid credentials" in log
    # a spool without room refuses before the body too
    full = gateway(spool={"min_free_mb": 1 << 30})
    assert _upload(f"{full.web_url}/dicom-web/studies", instance, dicom) == (503, ["503"], 0)
    assert "STOW-RS from 127.0.0.1 refused" in full.log()


WADL = "{http://wadl.dev.java.net/2009/02}"


def test_the_service_describes_itself_to_an_options_request(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """PS3.18 8.9, Retrieve Capabilities: ``OPTIONS`` on a DICOMweb root answers a WADL
    document (as JSON on request) of what is served there, under every root, behind
    the same credentials as the rest; each resource it lists answers its method."""
    gw = gateway(http_auth={"bearer_tokens": [TOKEN]})
    auth = ("--header", f"Authorization: Bearer {TOKEN}")
    (instance,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    r = curl("-X", "POST", "--header", "Content-Type: application/dicom", *auth, "--data-binary", f"@{instance}", f"{gw.web_url}/dicom-web/studies")
    assert r.status == 200, r.body
    gw.wait_counts(delivered=1)
    ds = pydicom.dcmread(instance)
    uids = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "instance": ds.SOPInstanceUID, "frames": "1", "tags": "7FE00010"}

    assert curl("-X", "OPTIONS", f"{gw.web_url}/dicom-web/").status == 401
    for root in ("/dicom-web", "/dicom-web/", "/v1", "/datastore/ds1/"):
        r = curl("-X", "OPTIONS", *auth, f"{gw.web_url}{root}")
        assert r.status == 200 and r.content_type.startswith("application/vnd.sun.wadl+xml"), (root, r.status)
        (resources,) = ET.fromstring(r.body).findall(f"{WADL}resources")
        assert resources.get("base") == f"{gw.web_url}{root.rstrip('/')}/"

    def walk(element: ET.Element, path: str) -> Iterator[tuple[str, str, str]]:
        for method in element.findall(f"{WADL}method"):
            yield path, method.get("name", ""), method.get("id", "")
        for child in element.findall(f"{WADL}resource"):
            yield from walk(child, f"{path}/{child.get('path')}")

    r = curl("-X", "OPTIONS", *auth, "--header", "Accept: application/vnd.sun.wadl+xml", f"{gw.web_url}/dicom-web")
    listed = list(walk(ET.fromstring(r.body).find(f"{WADL}resources"), ""))  # type: ignore[arg-type]
    ids = {name for _, _, name in listed}
    assert {"SearchForStudies", "SearchForStudySeriesInstances", "RetrieveStudy", "RetrieveInstanceMetadata", "RetrieveFrames",
            "RetrieveRenderedFrames", "RetrieveBulkdata", "StoreInstances", "StoreStudyInstances", "DeleteInstance"} <= ids
    assert "" not in ids and len(ids) == len(listed) == 29, listed  # each resource and method once, each named
    for path, method, name in listed:
        if method != "GET":
            continue
        url = gw.web_url + "/dicom-web" + path.format(**uids)
        accept = "image/png" if "Rendered" in name or "Thumbnail" in name else "*/*"
        got = curl(*auth, "--header", f"Accept: {accept}", url)
        assert got.status == 200, (name, url, got.status, got.body[:200])

    r = curl("-X", "OPTIONS", *auth, "--header", "Accept: application/json", f"{gw.web_url}/v1/")
    assert r.status == 200 and r.content_type.startswith("application/json")
    assert r.json()["application"]["resources"][0]["base"] == f"{gw.web_url}/v1/"
    assert curl("-X", "OPTIONS", *auth, "--header", "Accept: image/png", f"{gw.web_url}/v1/").status == 406
    # a browser's CORS preflight of the root is still answered as one
    r = curl("-X", "OPTIONS", f"{gw.web_url}/dicom-web/", "--header", "Origin: http://viewer.localhost",
             "--header", "Access-Control-Request-Method: GET")
    assert r.status == 403  # no cors_origins configured: refused, not described
    # with the service at the server's root
    bare = gateway(http={"base_path": "/"})
    r = curl("-X", "OPTIONS", f"{bare.web_url}/")
    assert r.status == 200 and ET.fromstring(r.body).find(f"{WADL}resources").get("base") == f"{bare.web_url}/"  # type: ignore[union-attr]
    # what would only be refused is not offered: a read-only facade stores and deletes nothing
    read_only = gateway(http={"read_only": True})
    methods = {m.get("name") for m in ET.fromstring(curl("-X", "OPTIONS", f"{read_only.web_url}/dicom-web/").body).iter(f"{WADL}method")}
    assert methods == {"GET"}


def test_the_service_description_drops_deletion_once_the_archive_refuses_it(gateway, orthanc: Orthanc, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Orthanc's DICOMweb deletes nothing (the gateway's DELETE answers 501): once it has
    said so, the WADL stops offering DELETE; stores are still offered."""
    gw = gateway(upstream_url=orthanc.dicomweb_url)

    def methods() -> set[str]:
        return {m.get("name", "") for m in ET.fromstring(curl("-X", "OPTIONS", f"{gw.web_url}/dicom-web/").body).iter(f"{WADL}method")}

    assert methods() == {"GET", "POST", "PUT", "DELETE"}
    (instance,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    assert dcmtk.storescu(gw.port, [instance], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1)
    assert curl("-X", "DELETE", f"{gw.web_url}/dicom-web/studies/{pydicom.dcmread(instance).StudyInstanceUID}").status == 501
    assert methods() == {"GET", "POST", "PUT"}
