"""A series retrieve in a syntax one of its instances cannot be converted to (its
RLE pixel data is corrupt): that instance is left out with a warning naming it, the
others arrive in a well-formed answer; when it comes first the answer's Warning
header says so; when nothing converts, 406. As stored (``transfer-syntax=*``) all
of them come."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless

from gateway.codecs.convert import transcode
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.synth import ct_series

ELE = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'


def _corrupt(path: Path) -> pydicom.Dataset:
    """The instance as RLE whose one segment offset points inside the RLE header."""
    ds = transcode(pydicom.dcmread(path), RLELossless)
    header = (1).to_bytes(4, "little") + (8).to_bytes(4, "little") + bytes(56)
    ds.PixelData = encapsulate([header + bytes(range(200))])
    ds.save_as(path, enforce_file_format=True)
    return ds


def _series(tmp_path: Path, name: str, study: str, count: int, bad: set[int]) -> tuple[list[Path], set[str]]:
    paths = ct_series(tmp_path / name, count, rows=32, columns=32, study_uid=study)
    return paths, {str(_corrupt(paths[n]).SOPInstanceUID) for n in bad}


@pytest.mark.slow
def test_an_instance_that_cannot_be_converted_is_left_out_not_the_answer(
    tmp_path: Path, gateway: Callable[..., Gateway]
) -> None:
    gw = gateway()
    study = pydicom.uid.generate_uid()
    middle, middle_bad = _series(tmp_path, "middle", study, 3, {1})
    first, first_bad = _series(tmp_path, "first", study, 2, {0})
    only, _ = _series(tmp_path, "only", study, 1, {0})
    for path in middle + first + only:
        r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom", "--data-binary", f"@{path}")
        assert r.status == 200, r.body
    gw.wait_counts(delivered=6)
    root = f"{gw.web_url}/dicom-web/studies/{study}/series"

    def series_url(paths: list[Path]) -> str:
        return f"{root}/{pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID}"

    r = curl(series_url(middle), "--header", f"Accept: {ELE}")
    assert r.status == 200 and "warning" not in r.headers  # it was met after the answer began
    got = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(body)) for _, body in r.parts()]
    expected = [pydicom.dcmread(p) for p in middle if str(pydicom.dcmread(p).SOPInstanceUID) not in middle_bad]
    assert [str(d.SOPInstanceUID) for d in got] == [str(d.SOPInstanceUID) for d in expected]
    assert all(np.array_equal(g.pixel_array, e.pixel_array) for g, e in zip(got, expected))
    (bad_uid,) = middle_bad
    assert f"instance {bad_uid} left out" in gw.log()

    r = curl(series_url(first), "--header", f"Accept: {ELE}")
    assert r.status == 200 and "1 instance(s) could not be converted" in r.headers["warning"]
    assert len(r.parts()) == 1 and next(iter(first_bad)) in gw.log()

    r = curl(series_url(only), "--header", f"Accept: {ELE}")
    assert r.status == 406 and b"convert" in r.body

    r = curl(series_url(middle), "--header", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*')
    assert r.status == 200 and len(r.parts()) == 3
    r = curl(f"{gw.web_url}/dicom-web/studies/{study}", "--header", f"Accept: {ELE}")
    assert r.status == 200 and len(r.parts()) == 3  # of 6: the three corrupt ones left out
    assert "Traceback" not in gw.log()  # each failure is one line, with every codec's reason
