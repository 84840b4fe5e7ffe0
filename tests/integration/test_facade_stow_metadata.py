"""STOW-RS of DICOM JSON (and PS3.19 XML) metadata with bulk data (PS3.18 10.5.1.2), sent by curl as a
script would (a request file built beforehand, ``--data-binary``), through the facade
to the embedded archive and to a real Orthanc: a photograph sent as a JPEG and a PDF
report become instances that read back byte for byte, render, and (in Orthanc) open
as the archive's own preview and PDF; an instance whose bulk data is missing fails on
its own with its reason while the others are stored."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from gateway.dicomweb.xml import native_xml
from tests.support.curl import curl
from tests.support.fixtures import gateway_over
from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc

BOUNDARY = "DICOMwebBoundary"
STUDY = "1.2.826.0.1.3680043.8.498.7001"
SERIES_PHOTO, SERIES_REPORT = f"{STUDY}.1", f"{STUDY}.2"
PHOTO, REPORT, BROKEN = f"{SERIES_PHOTO}.1", f"{SERIES_REPORT}.1", f"{SERIES_PHOTO}.2"
SC, PDF_CLASS = "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.1"


def _common(series: str, instance: str, sop_class: str) -> dict:
    return {
        "00080016": {"vr": "UI", "Value": [sop_class]},
        "00080018": {"vr": "UI", "Value": [instance]},
        "0020000D": {"vr": "UI", "Value": [STUDY]},
        "0020000E": {"vr": "UI", "Value": [series]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Jane"}]},
        "00100020": {"vr": "LO", "Value": ["MRN-7001"]},
        "00080060": {"vr": "CS", "Value": ["XC"]},
        "00200011": {"vr": "IS", "Value": [1]},
        "00200013": {"vr": "IS", "Value": [1]},
    }


def _photo() -> bytes:
    y, x = np.mgrid[0:120, 0:160]
    rgb = np.stack([(x * 1.5).astype(np.uint8), (y * 2).astype(np.uint8), np.full_like(x, 90, dtype=np.uint8)], axis=-1)
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, "JPEG", quality=92)
    return out.getvalue()


def _pdf() -> bytes:
    """A PDF larger than the facade keeps in memory (the part goes to a spill file)."""
    filler = b"%" + b"x" * 78 + b"\n"
    return b"%PDF-1.4\n" + filler * 4000 + b"1 0 obj<</Type/Catalog>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"


def _request_file(directory: Path, photo: bytes, pdf: bytes) -> Path:
    metadata = [
        {**_common(SERIES_PHOTO, PHOTO, SC), "7FE00010": {"vr": "OB", "BulkDataURI": "photo.jpg"}},
        {
            **_common(SERIES_REPORT, REPORT, PDF_CLASS),
            "00420012": {"vr": "LO", "Value": ["application/pdf"]},
            "00280301": {"vr": "CS", "Value": ["NO"]},
            "00420011": {"vr": "OB", "BulkDataURI": "report.pdf"},
        },
        {**_common(SERIES_PHOTO, BROKEN, SC), "7FE00010": {"vr": "OB", "BulkDataURI": "never-sent.jpg"}},
    ]
    body = b"".join(
        [
            f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode(), json.dumps(metadata).encode(),
            f"\r\n--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Location: photo.jpg\r\n\r\n".encode(), photo,
            f"\r\n--{BOUNDARY}\r\nContent-Type: application/pdf\r\nContent-Location: report.pdf\r\n\r\n".encode(), pdf,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )
    path = directory / "multipart-request-file"
    path.write_bytes(body)
    return path


@pytest.fixture(params=["local", "orthanc"])
def facade(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Orthanc | None]]:
    with gateway_over(request.param, tmp_path) as pair:
        yield pair


def test_metadata_and_bulk_data_become_instances(facade: tuple[Gateway, Orthanc | None], tmp_path: Path) -> None:
    gw, orthanc = facade
    photo, pdf = _photo(), _pdf()
    request_file = _request_file(tmp_path, photo, pdf)
    url = f"{gw.web_url}/dicom-web/studies"
    r = curl(
        "-X", "POST", "--header", f'Content-Type: multipart/related; type="application/dicom+json"; boundary={BOUNDARY}',
        "--header", "Accept: application/dicom+json", "--data-binary", f"@{request_file}", url,
    )
    assert r.status == 202, r.body
    answer = r.json()
    stored = {item["00081155"]["Value"][0] for item in answer["00081199"]["Value"]}
    failed = {item["00081155"]["Value"][0]: item["00081197"]["Value"][0] for item in answer["00081198"]["Value"]}
    assert stored == {PHOTO, REPORT} and failed == {BROKEN: 0xC000}
    gw.wait_counts(delivered=2)

    def instance(series: str, uid: str) -> pydicom.Dataset:
        got = curl(
            "--header", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*',
            f"{url}/{STUDY}/series/{series}/instances/{uid}",
        )
        assert got.status == 200
        (part,) = got.parts()
        return pydicom.dcmread(io.BytesIO(part[1]))

    image = instance(SERIES_PHOTO, PHOTO)
    assert image.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert (image.Rows, image.Columns, image.SamplesPerPixel, image.PhotometricInterpretation) == (120, 160, 3, "YBR_FULL_422")
    (fragment,) = pydicom.encaps.generate_frames(image.PixelData, number_of_frames=1)
    assert fragment[: len(photo)] == photo
    report = instance(SERIES_REPORT, REPORT)
    assert report.EncapsulatedDocument[: len(pdf)] == pdf and report.PatientID == "MRN-7001"

    rendered = curl("--header", "Accept: image/png", f"{url}/{STUDY}/series/{SERIES_PHOTO}/instances/{PHOTO}/rendered")
    assert rendered.status == 200
    with Image.open(io.BytesIO(rendered.body)) as png:
        assert png.size == (160, 120) and png.mode == "RGB"
        assert abs(int(np.asarray(png)[60, 80, 0]) - 120) < 12  # red channel ramps across
    if orthanc is not None:
        assert orthanc.instance_count() == 2
        preview = orthanc._request("GET", f"/instances/{orthanc.instance_id(PHOTO)}/preview")[2]
        with Image.open(io.BytesIO(preview)) as png:
            assert png.size == (160, 120)
        assert orthanc._request("GET", f"/instances/{orthanc.instance_id(REPORT)}/pdf")[2] == pdf
    log = gw.log()
    assert f"refused: {BROKEN}" in log and "never-sent.jpg" in log  # the request's one summary line
    assert "Doe" not in log and "MRN-7001" not in log
    assert not list((gw.spool_dir / "incoming").glob("*.part"))  # the spilled PDF part went


def test_small_parts_past_the_memory_budget_wait_on_disk(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """140 bulk parts of 250 KB (35 MB, past the 32 MiB the facade holds in memory):
    the photograph's part, sent last, is kept in a file, and its bytes still arrive
    whole; no file is left behind."""
    gw = gateway()
    url = f"{gw.web_url}/dicom-web/studies"
    photo = _photo()
    metadata = [{**_common(SERIES_PHOTO, PHOTO, SC), "7FE00010": {"vr": "OB", "BulkDataURI": "photo.jpg"}}]
    pieces = [f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode(), json.dumps(metadata).encode()]
    for n in range(140):
        pieces += [f"\r\n--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Location: unused-{n}\r\n\r\n".encode(), bytes([n]) * 250_000]
    pieces += [f"\r\n--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Location: photo.jpg\r\n\r\n".encode(), photo, f"\r\n--{BOUNDARY}--\r\n".encode()]
    r = _post(url, "application/dicom+json", b"".join(pieces), tmp_path)
    assert r.status == 200, r.body
    gw.wait_counts(delivered=1)
    got = curl("--header", "Accept: application/dicom; transfer-syntax=*", f"{url}/{STUDY}/series/{SERIES_PHOTO}/instances/{PHOTO}")
    (fragment,) = pydicom.encaps.generate_frames(pydicom.dcmread(io.BytesIO(got.body)).PixelData, number_of_frames=1)
    assert fragment[: len(photo)] == photo
    assert not list((gw.spool_dir / "incoming").glob("*.part"))


def test_xml_metadata_and_refusals(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """PS3.19 XML metadata (dcm4che's stowrs default) stores like JSON; an unreadable
    metadata part fails with 0xC000, so do a DTD and a metadata part over 64 MiB; a
    part type STOW-RS does not take is 415."""
    gw = gateway()
    url = f"{gw.web_url}/dicom-web/studies"
    photo = _photo()
    document = native_xml({**_common(SERIES_PHOTO, PHOTO, SC), "7FE00010": {"vr": "OB", "BulkDataURI": "cid:photo"}})
    body = b"".join(
        [
            f"--{BOUNDARY}\r\nContent-Type: application/dicom+xml\r\n\r\n".encode(), document,
            f"\r\n--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Location: cid:photo\r\n\r\n".encode(), photo,
            f"\r\n--{BOUNDARY}--\r\n".encode(),
        ]
    )
    r = _post(url, "application/dicom+xml", body, tmp_path)
    assert r.status == 200, r.body
    assert r.json()["00081199"]["Value"][0]["00081155"]["Value"] == [PHOTO]
    gw.wait_counts(delivered=1)
    got = curl("--header", "Accept: application/dicom", f"{url}/{STUDY}/series/{SERIES_PHOTO}/instances/{PHOTO}")
    assert got.status == 200 and pydicom.dcmread(io.BytesIO(got.body)).Columns == 160

    for kind, metadata in (("application/dicom+json", b"{not json"), ("application/dicom+xml", b'<!DOCTYPE x [<!ENTITY a "a">]><x/>')):
        body = f"--{BOUNDARY}\r\nContent-Type: {kind}\r\n\r\n".encode() + metadata + f"\r\n--{BOUNDARY}--\r\n".encode()
        r = _post(url, kind, body, tmp_path)
        assert r.status == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000], kind
    huge = b"[" + b" " * (64 << 20) + b"]"  # valid JSON, but no metadata is this large
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode() + huge + f"\r\n--{BOUNDARY}--\r\n".encode()
    r = _post(url, "application/dicom+json", body, tmp_path)
    assert r.status == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert "1 failed (1 x metadata too large)" in gw.log()  # the details at DEBUG
    r = _post(url, "application/pdf", b"--x--", tmp_path)
    assert r.status == 415 and b"application/dicom+json" in r.body
    log = gw.log()
    assert "Traceback" not in log and "metadata part unreadable" in log


def _post(url: str, part_type: str, body: bytes, directory: Path):  # type: ignore[no-untyped-def]
    request_file = directory / "request"
    request_file.write_bytes(body)
    return curl(
        "-X", "POST", "--header", f'Content-Type: multipart/related; type="{part_type}"; boundary={BOUNDARY}',
        "--header", "Accept: application/dicom+json", "--data-binary", f"@{request_file}", url,
    )


def test_a_vr_the_standard_does_not_give_fails_alone_and_keeps_the_archive_searchable(
    orthanc: Orthanc, gateway, tmp_path: Path  # type: ignore[no-untyped-def]
) -> None:
    """Found by fuzzing STOW-RS metadata: an object giving a public attribute a VR that
    PS3.6 does not (BitsAllocated as PN) was encoded as given and delivered; Orthanc
    stored it, then answered 400 ("Bad file format") to every instance search of its
    study, and to ``/instances`` with no key at all. It now fails alone (0xC000, the
    reason names the attribute); its study-mate is stored, and the archive's searches
    stay whole."""
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    good = _common(SERIES_PHOTO, PHOTO, SC)
    bad = {**_common(SERIES_PHOTO, BROKEN, SC), "00280100": {"vr": "PN", "Value": ["1.2.3"]}}
    body = f"--{BOUNDARY}\r\nContent-Type: application/dicom+json\r\n\r\n".encode() + json.dumps([good, bad]).encode()
    r = _post(f"{gw.web_url}/dicom-web/studies", "application/dicom+json", body + f"\r\n--{BOUNDARY}--\r\n".encode(), tmp_path)
    assert r.status == 202, r.body
    failed = r.json()["00081198"]["Value"]
    assert [(f["00081155"]["Value"], f["00081197"]["Value"]) for f in failed] == [([BROKEN], [0xC000])]
    gw.wait_counts(delivered=1)
    assert orthanc.sop_instance_uids() == {PHOTO}
    for path in (f"/dicom-web/studies/{STUDY}/instances", "/dicom-web/instances"):
        status, _, _ = orthanc._request("GET", path)
        assert status == 200, path
    assert "gives BitsAllocated the VR PN" in gw.log()
