"""Rendered resources through the daemon over the embedded archive, pixel-checked
against the standard's VOI formulas in numpy on synthetic instances:

* a 3-frame instance whose window has the VOI LUT Function SIGMOID: the instance
  renders frame 1, ``/frames/{n}/rendered`` frame n; a requested window with
  ``linear-exact`` or ``sigmoid`` replaces the instance's;
* an instance with a VOI LUT Sequence (and a window, which the table wins over);
* an instance with a Modality LUT Sequence (and a rescale, which the table wins over);
* series and study: every instance with an image rendered, one part each
  (PS3.18 10.4.1.1.3), an instance without pixel data left out; the thumbnail one image.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.synth import ct_series

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
LUT_FIRST, LUT_BITS = -1024, 12


def _eight(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def _png(body: bytes) -> np.ndarray:
    return np.asarray(Image.open(BytesIO(body)))


def _sigmoid(stored: np.ndarray, slope: float, intercept: float, c: float, w: float) -> np.ndarray:
    x = stored.astype(np.float64) * slope + intercept
    return _eight(1.0 / (1.0 + np.exp(-4.0 * (x - c) / w)))


def _linear_exact(stored: np.ndarray, slope: float, intercept: float, c: float, w: float) -> np.ndarray:
    x = stored.astype(np.float64) * slope + intercept
    return _eight(np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5)))


def _instances(tmp_path: Path) -> tuple[Dataset, Dataset, Dataset]:
    """(3-frame SIGMOID, VOI LUT, no pixel data): the first two in one series."""
    multi, lut = (pydicom.dcmread(p) for p in ct_series(tmp_path / "ct", 2, rows=32, columns=32))
    study = multi.StudyInstanceUID
    ramp = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32)
    frames = np.stack([(ramp * (k + 1) + 300 * k) % 4096 for k in range(3)]).astype(np.uint16)
    multi.NumberOfFrames, multi.PixelData = 3, frames.tobytes()
    multi.RescaleSlope, multi.RescaleIntercept = 2, -1000
    multi.WindowCenter, multi.WindowWidth, multi.VOILUTFunction = 1500, 3000, "SIGMOID"
    multi.InstanceNumber = 2
    item = Dataset()
    table = (np.sqrt(np.arange(4096)) * (4095 / 64)).astype(np.uint16)
    item.add_new(0x00283002, "SS", [4096, LUT_FIRST, LUT_BITS])  # LUT Descriptor: a negative first value
    item.add_new(0x00283006, "US", table.tolist())  # LUT Data
    lut.VOILUTSequence = [item]
    lut.WindowCenter, lut.WindowWidth = 40, 400
    lut.InstanceNumber = 1
    report = copy.deepcopy(lut)
    for keyword in ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation", "VOILUTSequence", "WindowCenter", "WindowWidth",
                    "RescaleSlope", "RescaleIntercept"):
        delattr(report, keyword)
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    report.SeriesInstanceUID, report.Modality = pydicom.uid.generate_uid(), "SR"
    for ds in (multi, lut, report):
        assert ds.StudyInstanceUID == study
    return multi, lut, report


@pytest.fixture
def loaded(tmp_path: Path, gateway: Callable[..., Gateway]) -> tuple[Gateway, Dataset, Dataset, Dataset]:
    gw = gateway()
    datasets = _instances(tmp_path)
    for n, ds in enumerate(datasets):
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom", "--data-binary", f"@{path}")
        assert r.status == 200, r.body
    gw.wait_counts(delivered=3)
    return (gw, *datasets)


def _url(gw: Gateway, ds: Dataset) -> str:
    return f"{gw.web_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"


@pytest.mark.slow
def test_rendered_pixels_follow_the_voi_the_instance_or_request_names(loaded: tuple[Gateway, Dataset, Dataset, Dataset]) -> None:
    gw, multi, lut, _ = loaded
    frames = multi.pixel_array
    png = ("--header", "Accept: image/png")
    r = curl(f"{_url(gw, multi)}/rendered", *png)
    assert r.status == 200 and r.content_type == "image/png"
    assert np.array_equal(_png(r.body), _sigmoid(frames[0], 2, -1000, 1500, 3000))
    for n in (1, 2, 3):
        r = curl(f"{_url(gw, multi)}/frames/{n}/rendered", *png)
        assert r.status == 200
        assert np.array_equal(_png(r.body), _sigmoid(frames[n - 1], 2, -1000, 1500, 3000)), n
    r = curl(f"{_url(gw, multi)}/frames/2/rendered?window=2000,1000,linear-exact", *png)
    assert np.array_equal(_png(r.body), _linear_exact(frames[1], 2, -1000, 2000, 1000))
    r = curl(f"{_url(gw, multi)}/frames/3/rendered?window=500,2500,sigmoid", *png)
    assert np.array_equal(_png(r.body), _sigmoid(frames[2], 2, -1000, 500, 2500))
    assert curl(f"{_url(gw, multi)}/frames/4/rendered", *png).status == 400
    assert curl(f"{_url(gw, multi)}/rendered?window=1,0,sigmoid", *png).status == 400
    assert curl(f"{_url(gw, multi)}/rendered?window=1,100,cubic", *png).status == 400

    table = np.asarray(lut.VOILUTSequence[0].LUTData)
    x = lut.pixel_array.astype(np.float64) + float(lut.RescaleIntercept)
    expected = _eight(table[np.clip(np.rint(x) - LUT_FIRST, 0, len(table) - 1).astype(int)] / float((1 << LUT_BITS) - 1))
    r = curl(f"{_url(gw, lut)}/rendered", *png)
    assert r.status == 200 and np.array_equal(_png(r.body), expected)
    # a requested window replaces the table
    r = curl(f"{_url(gw, lut)}/rendered?window=1000,200,linear-exact", *png)
    assert np.array_equal(_png(r.body), _linear_exact(lut.pixel_array, 1, float(lut.RescaleIntercept), 1000, 200))


@pytest.mark.slow
def test_study_and_series_render_every_image_instance(loaded: tuple[Gateway, Dataset, Dataset, Dataset]) -> None:
    gw, multi, lut, report = loaded
    singles = {ds.SOPInstanceUID: curl(f"{_url(gw, ds)}/rendered", "--header", "Accept: image/png").body for ds in (multi, lut)}
    study = f"{gw.web_url}/dicom-web/studies/{multi.StudyInstanceUID}"
    for url in (f"{study}/series/{multi.SeriesInstanceUID}/rendered", f"{study}/rendered"):
        for accept in ("image/png", "multipart/related; type=image/png"):
            r = curl(url, "--header", f"Accept: {accept}")
            assert r.status == 200, r.body
            assert r.content_type.startswith("multipart/related") and 'type="image/png"' in r.content_type
            parts = r.parts()
            # by Instance Number: the VOI LUT instance (1) before the multi-frame one (2); the report left out
            assert [h["content-location"].rsplit("/", 2)[1] for h, _ in parts] == [lut.SOPInstanceUID, multi.SOPInstanceUID]
            assert all(h["content-type"] == "image/png" for h, _ in parts)
            assert [np.array_equal(_png(body), _png(singles[h["content-location"].rsplit("/", 2)[1]])) for h, body in parts] == [True, True]
    r = curl(f"{study}/rendered", "--header", "Accept: image/jpeg")
    assert r.status == 200 and all(body.startswith(b"\xff\xd8") for _, body in r.parts())
    r = curl(f"{study}/series/{report.SeriesInstanceUID}/rendered", "--header", "Accept: image/png")
    assert r.status == 404
    r = curl(f"{study}/series/{multi.SeriesInstanceUID}/thumbnail", "--header", "Accept: image/png")
    assert r.status == 200 and r.content_type == "image/png" and max(Image.open(BytesIO(r.body)).size) <= 128


@pytest.mark.slow
def test_a_modality_lut_sequence_maps_stored_values(tmp_path: Path, gateway: Callable[..., Gateway]) -> None:
    gw = gateway()
    (path,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    ds = pydicom.dcmread(path)
    table = (np.arange(4096) ** 2 // 4096).astype(np.uint16)  # a curve no rescale can express
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUT Descriptor
    item.add_new(0x00283006, "US", table.tolist())  # LUT Data: bulk data in metadata
    item.ModalityLUTType = "HU"
    ds.ModalityLUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2000, 4000, "LINEAR_EXACT"
    ds.save_as(path, enforce_file_format=True)
    r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom", "--data-binary", f"@{path}")
    assert r.status == 200, r.body
    gw.wait_counts(delivered=1)
    r = curl(f"{_url(gw, ds)}/rendered", "--header", "Accept: image/png")
    assert r.status == 200, r.body
    assert np.array_equal(_png(r.body), _linear_exact(table[ds.pixel_array], 1, 0, 2000, 4000))


@pytest.mark.slow
def test_the_accept_query_parameter_negotiates_for_hyperlinks(loaded: tuple[Gateway, Dataset, Dataset, Dataset]) -> None:
    """PS3.18 8.3.3.1: a link in a report or an <img> cannot set the Accept header
    (curl sends ``*/*`` as browsers do); ``?accept=`` names the media type instead,
    and only where the header admits it."""
    gw, multi, lut, _ = loaded
    png = curl(f"{_url(gw, lut)}/rendered", "--header", "Accept: image/png").body
    r = curl(f"{_url(gw, lut)}/rendered?accept=image/png")
    assert r.status == 200 and r.content_type == "image/png" and r.body == png
    assert curl(f"{_url(gw, lut)}/rendered").content_type == "image/jpeg"  # the default, for contrast
    r = curl(f"{_url(gw, lut)}/rendered?accept=image/png", "--header", "Accept:")  # no header at all
    assert r.status == 200 and r.content_type == "image/png"
    r = curl(f"{_url(gw, lut)}/rendered?accept=image/png", "--header", "Accept: image/jpeg")  # not admitted: ignored
    assert r.status == 200 and r.content_type == "image/jpeg"
    r = curl(f"{_url(gw, multi)}/frames/2/rendered?accept=image/gif,image/png;q=0.5&window=2000,1000,linear-exact")
    assert r.status == 200 and r.content_type == "image/gif"

    xml = 'multipart/related; type="application/dicom+xml"'
    r = curl("--get", f"{_url(gw, lut)}/metadata", "--data-urlencode", f"accept={xml}")
    assert r.status == 200 and 'type="application/dicom+xml"' in r.content_type
    ((_, document),) = r.parts()
    assert lut.SOPInstanceUID.encode() in document and document.lstrip().startswith(b"<?xml")
    r = curl("--get", f"{gw.web_url}/dicom-web/studies", "--data-urlencode", f"accept={xml}",
             "--data-urlencode", f"StudyInstanceUID={multi.StudyInstanceUID}")
    assert r.status == 200 and 'type="application/dicom+xml"' in r.content_type, r.body
    assert len(r.parts()) == 1
    r = curl(f"{gw.web_url}/dicom-web/studies?accept=application/dicom%2Bjson&StudyInstanceUID={multi.StudyInstanceUID}")
    assert r.status == 200 and [s["0020000D"]["Value"] for s in r.json()] == [[multi.StudyInstanceUID]]


@pytest.mark.slow
def test_malformed_rendering_parameters_get_400_naming_the_parameter(loaded: tuple[Gateway, Dataset, Dataset, Dataset]) -> None:
    """``nan`` and ``inf`` parse as numbers in Python: each reached the renderer (a 500
    for ``viewport=inf,inf``, a NaN window rendered); a frame number below 1 was served
    as frame 1; a number of 5000 digits was a 500 (int() refuses more than 4300)."""
    gw, multi, lut, _ = loaded
    wado = (
        f"{gw.web_url}/wado?requestType=WADO&studyUID={lut.StudyInstanceUID}&seriesUID={lut.SeriesInstanceUID}"
        f"&objectUID={lut.SOPInstanceUID}&contentType=image/png"
    )
    bad = {
        f"{_url(gw, lut)}/rendered?viewport=inf,inf": "viewport",
        f"{_url(gw, lut)}/rendered?viewport=-1,5": "viewport",
        f"{_url(gw, lut)}/thumbnail?viewport=0,0": "viewport",
        f"{_url(gw, lut)}/rendered?viewport=nan,5": "viewport",
        f"{_url(gw, lut)}/rendered?quality=1000": "quality",
        f"{_url(gw, lut)}/rendered?window=nan,nan": "window",
        f"{_url(gw, lut)}/rendered?window=inf,10,linear": "window",
        f"{wado}&frameNumber=-3": "frameNumber",
        f"{wado}&frameNumber=1.5": "frameNumber",
        f"{wado}&rows=inf": "rows",
        f"{wado}&columns=0": "columns",
        f"{wado}&windowCenter=nan&windowWidth=400": "windowCenter",
        f"{wado}&imageQuality=0": "imageQuality",
        f"{_url(gw, lut)}/rendered?viewport={'9' * 5000},5": "viewport",  # int() refuses over 4300 digits
        f"{wado}&frameNumber={'9' * 5000}": "frameNumber",
    }
    for url, name in bad.items():
        r = curl(url)
        assert r.status == 400 and r.body.startswith(f"{name}: expected".encode()), (url, r.status, r.body)
    huge = "9" * 5000
    for url, words in {
        f"{_url(gw, lut)}/frames/{huge}": b"frame numbers are positive integers",
        f"{_url(gw, lut)}/frames/{huge}/rendered": b"one positive frame number",
        f"{gw.web_url}/dicom-web/studies?limit={huge}": b"limit: not a non-negative integer",
        f"{gw.web_url}/dicom-web/studies?offset={huge}": b"offset: not a non-negative integer",
    }.items():
        r = curl(url)
        assert r.status == 400 and words in r.body, (url[:120], r.status, r.body)
    for url in (f"{_url(gw, lut)}/rendered?viewport=64,64,0,0,10,10&quality=100", f"{wado}&frameNumber=1&rows=32&imageQuality=1"):
        assert curl(url).status == 200, url
    assert "Traceback" not in gw.log() and " ERROR " not in gw.log()
