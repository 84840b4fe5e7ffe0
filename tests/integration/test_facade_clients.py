"""Real DICOMweb clients against the facade, over the embedded archive and over Orthanc.

* ``dicomweb-client`` (PyPI) stores a small corpus of lossless compressed and native
  instances, searches, retrieves studies, series, instances and metadata, and asks
  frames, which must equal pydicom's own decoding pixel for pixel whatever the stored
  syntax (the gateway converts them itself, checking the archive's labels).
* curl for what dicomweb-client cannot ask: HTJ2K frames (``image/jphc``) as stored
  and converted, an Accept header with q-values and several types, 406.
* STOW-RS bodies with bad parts: the good parts are stored, each bad one fails alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut
from pydicom.uid import generate_uid

from gateway.codecs.convert import transcode
from gateway.codecs.description import PixelDescription
from gateway.codecs.frames import decode_frame
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc, build_multipart_related

TOKEN = "client-token"
HTJ2K = "1.2.840.10008.1.2.4.201"
ELE = "1.2.840.10008.1.2.1"
# Lossless sources of several syntaxes, colour and multi-frame included.
SOURCES = (
    "SC_rgb_rle_2frame.dcm",  # RLE, RGB, 2 frames
    "MR_small_RLE.dcm",  # RLE, 16-bit
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless SV1, RGB
    "CT_small.dcm",  # Explicit VR Little Endian
    "examples_palette.dcm",  # PALETTE COLOR
)


@dataclass
class Loaded:
    gw: Gateway
    orthanc: Orthanc | None
    study: str
    files: dict[str, pydicom.Dataset]  # name -> data set as stored (fresh UIDs)

    @property
    def url(self) -> str:
        return f"{self.gw.web_url}/dicom-web"

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(self.url, headers={"Authorization": f"Bearer {TOKEN}"})


def corpus(directory: Path, study: str) -> dict[str, pydicom.Dataset]:
    """The sources with fresh UIDs in one study of one patient (the MR_small variants
    share their UIDs; Orthanc keys a study by patient and UID together), plus CT_small
    converted to HTJ2K by the gateway's own codec."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in SOURCES:
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        out[name] = ds
    htj2k = transcode(pydicom.dcmread(get_testdata_file("CT_small.dcm")), HTJ2K)
    htj2k.StudyInstanceUID = study
    htj2k.SeriesInstanceUID = generate_uid()
    htj2k.SOPInstanceUID = htj2k.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    out["CT_small_htj2k"] = htj2k
    for name, ds in out.items():
        ds.PatientID, ds.PatientName = "FACADE-1", "Facade^Test"
        ds.save_as(directory / f"{name}.dcm", enforce_file_format=True)
        out[name] = pydicom.dcmread(directory / f"{name}.dcm")
    return out


@pytest.fixture(scope="module", params=["local", "orthanc"])
def loaded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    """A facade over the embedded archive or Orthanc, the corpus stored through it
    by dicomweb-client's STOW-RS."""
    tmp = tmp_path_factory.mktemp(f"facade-{request.param}")
    orthanc = Orthanc(workdir=tmp / "orthanc").start() if request.param == "orthanc" else None
    gw = Gateway(tmp / "gw", upstream_url=orthanc.dicomweb_url if orthanc else None, http_auth={"bearer_tokens": [TOKEN]})
    try:
        gw.start()
        study = generate_uid()
        files = corpus(tmp / "corpus", study)
        loaded = Loaded(gw, orthanc, study, files)
        answer = loaded.client().store_instances(datasets=list(files.values()))
        assert len(answer.ReferencedSOPSequence) == len(files)
        gw.wait_counts(delivered=len(files))
        yield loaded
    finally:
        gw.kill()
        if orthanc is not None:
            orthanc.cleanup()


def _pixels(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's own decoding, frames first."""
    arr = ds.pixel_array
    return arr if int(ds.get("NumberOfFrames") or 1) > 1 else arr[np.newaxis]


def _native(frame: bytes, ds: pydicom.Dataset) -> np.ndarray:
    """An ELE frame as an array shaped like one of ``_pixels``."""
    desc = PixelDescription.from_dataset(ds)
    shape = (ds.Rows, ds.Columns, ds.SamplesPerPixel) if ds.SamplesPerPixel > 1 else (ds.Rows, ds.Columns)
    return np.frombuffer(frame[: int(np.prod(shape)) * desc.dtype.itemsize], dtype=desc.dtype.newbyteorder("<")).reshape(shape)


@pytest.mark.slow
def test_dicomweb_client_searches_and_retrieves(loaded: Loaded) -> None:
    client = loaded.client()
    studies = client.search_for_studies(search_filters={"StudyInstanceUID": loaded.study})
    assert [s["0020000D"]["Value"][0] for s in studies] == [loaded.study]
    assert client.search_for_studies(search_filters={"PatientName": "NOBODY*"}) == []
    series = client.search_for_series(loaded.study)
    assert len(series) == len(loaded.files)
    instances = client.search_for_instances(loaded.study, fields=["Rows"])
    assert {i["00080018"]["Value"][0] for i in instances} == {ds.SOPInstanceUID for ds in loaded.files.values()}
    assert client.search_for_instances(loaded.study, limit=2, offset=1).__len__() == 2

    retrieved = client.retrieve_study(loaded.study, media_types=(("application/dicom", "*"),))
    by_uid = {ds.SOPInstanceUID: ds for ds in retrieved}
    for ds in loaded.files.values():
        got = by_uid[ds.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID  # as stored
        assert got.PixelData == ds.PixelData
    rle = loaded.files["SC_rgb_rle_2frame.dcm"]
    series_answer = client.retrieve_series(loaded.study, rle.SeriesInstanceUID)
    assert [d.SOPInstanceUID for d in series_answer] == [rle.SOPInstanceUID]
    # no transfer syntax named: Explicit VR Little Endian, converted by the gateway
    assert series_answer[0].file_meta.TransferSyntaxUID == ELE
    assert np.array_equal(series_answer[0].pixel_array, rle.pixel_array)
    ct = loaded.files["CT_small.dcm"]
    j2k = client.retrieve_instance(
        loaded.study, ct.SeriesInstanceUID, ct.SOPInstanceUID, media_types=(("application/dicom", "1.2.840.10008.1.2.4.90"),)
    )
    assert j2k.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"  # converted losslessly by the gateway
    assert np.array_equal(j2k.pixel_array, ct.pixel_array)
    one = client.retrieve_instance(loaded.study, rle.SeriesInstanceUID, rle.SOPInstanceUID)
    assert np.array_equal(one.pixel_array, rle.pixel_array)
    png = client.retrieve_instance_rendered(loaded.study, rle.SeriesInstanceUID, rle.SOPInstanceUID, media_types=("image/png",))
    assert np.array_equal(np.asarray(Image.open(BytesIO(png))), rle.pixel_array[0])  # 8-bit RGB: rendered as is
    jpeg = client.retrieve_instance_frames_rendered(
        loaded.study, rle.SeriesInstanceUID, rle.SOPInstanceUID, frame_numbers=[2], media_types=("image/jpeg",)
    )
    assert Image.open(BytesIO(jpeg)).size == (rle.Columns, rle.Rows)
    metadata = client.retrieve_instance_metadata(loaded.study, rle.SeriesInstanceUID, rle.SOPInstanceUID)
    assert metadata["00080018"]["Value"][0] == rle.SOPInstanceUID
    assert len(client.retrieve_study_metadata(loaded.study)) == len(loaded.files)
    # BulkDataURIs name the facade, whatever the archive wrote; the value comes back whole
    ct = loaded.files["CT_small.dcm"]
    assert all("bulk" not in json.dumps(m).replace("/bulkdata/", "") for m in client.retrieve_study_metadata(loaded.study))
    with_pixels = [m for m in client.retrieve_study_metadata(loaded.study) if "7FE00010" in m]  # Orthanc omits some
    assert ct.SOPInstanceUID in {m["00080018"]["Value"][0] for m in with_pixels}
    for metadata in with_pixels:
        uri = metadata["7FE00010"]["BulkDataURI"]
        sop = metadata["00080018"]["Value"][0]
        # built from the Host header, which dicomweb-client sends without the port
        assert uri == f"http://127.0.0.1/dicom-web/studies/{loaded.study}/series/{metadata['0020000E']['Value'][0]}/instances/{sop}/bulkdata/7FE00010"
    uri = f"{loaded.url}/studies/{loaded.study}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/bulkdata/7FE00010"
    r = curl(uri, "--header", f"Authorization: Bearer {TOKEN}", "--header", 'Accept: multipart/related; type="application/octet-stream"')
    assert r.status == 200
    (headers, value), = r.parts()
    assert headers["content-type"] == "application/octet-stream" and value == ct.PixelData
    assert curl(uri.replace("7FE00010", "7FE00011"), "--header", f"Authorization: Bearer {TOKEN}").status == 404


@pytest.mark.slow
def test_frames_equal_pydicoms_decoding_whatever_the_stored_syntax(loaded: Loaded) -> None:
    client = loaded.client()
    for name, ds in loaded.files.items():
        count = int(ds.get("NumberOfFrames") or 1)
        frames = client.retrieve_instance_frames(
            loaded.study, ds.SeriesInstanceUID, ds.SOPInstanceUID, frame_numbers=list(range(1, count + 1)),
            media_types=(("application/octet-stream", ELE),),
        )
        expected = _pixels(ds)
        assert len(frames) == count, name
        for n, frame in enumerate(frames):
            assert np.array_equal(_native(frame, ds), expected[n]), f"{name} frame {n + 1}"


@pytest.mark.slow
def test_htj2k_frames_as_stored_and_converted(loaded: Loaded) -> None:
    auth = ("--header", f"Authorization: Bearer {TOKEN}")
    ht, ct = loaded.files["CT_small_htj2k"], loaded.files["CT_small.dcm"]
    base = f"{loaded.url}/studies/{loaded.study}/series"
    ht_frames = f"{base}/{ht.SeriesInstanceUID}/instances/{ht.SOPInstanceUID}/frames/1"
    ct_frames = f"{base}/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}/frames/1"
    desc = PixelDescription.from_dataset(ct)
    # as stored: the HTJ2K codestream, labelled so
    r = curl(ht_frames, *auth, "--header", 'Accept: multipart/related; type="image/jphc"')
    assert r.status == 200, r.body
    (headers, stream), = r.parts()
    assert headers["content-type"] == f"image/jphc; transfer-syntax={HTJ2K}"
    assert stream.startswith(b"\xff\x4f\xff\x51")
    assert np.array_equal(decode_frame(stream, HTJ2K, desc), ct.pixel_array)
    # ELE of the HTJ2K instance (Orthanc would label the raw codestream as ELE): the pixels
    r = curl(ht_frames, *auth, "--header", "Accept: multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1")
    (headers, frame), = r.parts()
    assert headers["content-type"] == f"application/octet-stream; transfer-syntax={ELE}"
    assert np.array_equal(_native(frame, ct), ct.pixel_array)
    # HTJ2K of a native instance: encoded by the gateway, lossless; preferred by q-value
    r = curl(ct_frames, *auth, "--header",
             'Accept: multipart/related; type="application/octet-stream"; q=0.5, multipart/related; type="image/jphc"; transfer-syntax="1.2.840.10008.1.2.4.201"; q=0.9')
    (headers, stream), = r.parts()
    assert headers["content-type"].startswith("image/jphc")
    assert np.array_equal(decode_frame(stream, HTJ2K, desc), ct.pixel_array)
    # OHIF's metadata Accept: several types in one header
    r = curl(f"{base}/{ct.SeriesInstanceUID}/metadata", *auth, "--header",
             "Accept: application/dicom+json, multipart/related; type=application/octet-stream; transfer-syntax=*")
    assert r.status == 200 and r.json()[0]["00080018"]["Value"][0] == ct.SOPInstanceUID
    # 406 names what can be produced: JPEG baseline cannot carry 16-bit samples
    r = curl(ct_frames, *auth, "--header", 'Accept: multipart/related; type="image/jpeg"')
    assert r.status == 406
    assert b"application/octet-stream" in r.body and b"image/jphc" in r.body
    r = curl(ct_frames.replace("/frames/1", "/frames/2"), *auth)
    assert r.status == 400


@pytest.mark.slow
def test_rendered_palette_colour_and_monochrome(loaded: Loaded) -> None:
    auth = ("--header", f"Authorization: Bearer {TOKEN}")
    palette = loaded.files["examples_palette.dcm"]
    url = f"{loaded.url}/studies/{loaded.study}/series/{palette.SeriesInstanceUID}/instances/{palette.SOPInstanceUID}"
    r = curl(f"{url}/rendered", *auth, "--header", "Accept: image/png")
    assert r.status == 200, r.body
    expected = apply_color_lut(palette.pixel_array, palette)
    if expected.dtype == np.uint16:
        expected = (expected >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(Image.open(BytesIO(r.body)).convert("RGB")), expected)
    # MONOCHROME with the request's window: a width-1 window is a threshold at the center
    ct = loaded.files["CT_small.dcm"]
    url = f"{loaded.url}/studies/{loaded.study}/series/{ct.SeriesInstanceUID}/instances/{ct.SOPInstanceUID}"
    center = float(ct.RescaleSlope) * 200 + float(ct.RescaleIntercept)
    r = curl(f"{url}/rendered?window={center},1,linear", *auth, "--header", "Accept: image/png")
    assert r.status == 200, r.body
    png = np.asarray(Image.open(BytesIO(r.body)))
    assert np.array_equal(png == 255, ct.pixel_array > 199.5)


@pytest.mark.slow
def test_stow_stores_the_good_parts_and_fails_each_bad_one(loaded: Loaded, tmp_path: Path) -> None:
    good = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    good.StudyInstanceUID = loaded.study
    good.PatientID, good.PatientName = "FACADE-1", "Facade^Test"
    good.SeriesInstanceUID = generate_uid()
    good.SOPInstanceUID = good.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = BytesIO()
    good.save_as(buffer, enforce_file_format=True)
    good_bytes = buffer.getvalue()
    other = pydicom.dcmread(BytesIO(good_bytes))
    other.StudyInstanceUID = generate_uid()
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = BytesIO()
    other.save_as(buffer, enforce_file_format=True)
    truncated = good_bytes[: len(good_bytes) // 2]
    content_type, body = build_multipart_related([good_bytes, b"not dicom at all" * 10, truncated, buffer.getvalue()])
    (tmp_path / "body").write_bytes(body)
    before = loaded.gw.counts()
    r = curl("-X", "POST", f"{loaded.url}/studies/{loaded.study}", "--header", f"Content-Type: {content_type}",
             "--header", f"Authorization: Bearer {TOKEN}", "--data-binary", f"@{tmp_path / 'body'}")
    assert r.status == 202, r.body
    answer = r.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [good.SOPInstanceUID]
    reasons = [i["00081197"]["Value"][0] for i in answer["00081198"]["Value"]]
    assert reasons == [0xC000, 0xC000, 0xA900]
    assert answer["00081198"]["Value"][2]["00081155"]["Value"][0] == other.SOPInstanceUID
    loaded.gw.wait_counts(delivered=before["delivered"] + 1)
    # nothing but good parts: 409
    content_type, body = build_multipart_related([b"garbage" * 100])
    (tmp_path / "bad").write_bytes(body)
    r = curl("-X", "POST", f"{loaded.url}/studies", "--header", f"Content-Type: {content_type}",
             "--header", f"Authorization: Bearer {TOKEN}", "--data-binary", f"@{tmp_path / 'bad'}")
    assert r.status == 409 and json.loads(r.body)["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    r = curl("-X", "POST", f"{loaded.url}/studies", "--header", "Content-Type: text/plain",
             "--header", f"Authorization: Bearer {TOKEN}", "--data-binary", "x")
    assert r.status == 415
    assert not any((loaded.gw.spool_dir / "incoming").iterdir())
