"""The facade's HealthImaging-style routes over the HealthImaging emulator: an
``imageSetId`` in the request names the image set read (passed on to the service,
its metadata read by ID, never searched for); an unknown one is a 404 that names it.

The seed frames example (seeds/000) runs as the vendor wrote it, host changed and the
image set ID the emulator gave substituted; the instances are stored through the
facade as in seeds/001. A second instance of the study whose study attributes
conflict lands in a non-primary image set, which WADO-RS shows only with its
``imageSetId``: reading it through the facade proves the ID was passed on.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway.codecs.description import PixelDescription
from gateway.codecs.frames import decode_frame
from tests.healthimaging.test_daemon import healthimaging_upstream, key_env
from tests.support.curl import curl
from tests.support.healthimaging import Emulator
from tests.support.orthanc import parse_multipart_related

DATASTORE = "d9a2a515ab294163a2d2f4069eed584c"
STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826285059.5457"
SERIES = "1.3.6.1.4.1.5962.1.3.4.1.20040825185059.5457"
SOP = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826186059.5457"
OTHER_SERIES = "1.3.6.1.4.1.5962.1.3.4.1.20040825185059.5458"
OTHER_SOP = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826186059.5458"
UNKNOWN_SET = "459e50687f121185f747b67bb60d1bc8"  # the seed's own ID: no such image set here
SIGV4 = ("--aws-sigv4", "aws:amz:us-east-1:medical-imaging", "--user", "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
ELE = "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
HTJ2K_RPCL = "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.202"


def _instance(series: str, sop: str, description: str | None = None) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "HI-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    if description is not None:
        ds.StudyDescription = description
    return ds


def _searches(emulator: Emulator, since: int) -> list[str]:
    return [r.operation for r in emulator.requests[since:] if r.operation == "SearchImageSets"]


@pytest.mark.slow
@pytest.mark.parametrize("retrieve_path", ["frames", "dicomweb"])
def test_image_set_id_is_passed_to_healthimaging(emulator: Emulator, gateway: Any, tmp_path: Any, retrieve_path: str) -> None:
    gw = gateway(
        upstream=healthimaging_upstream(emulator, f'retrieve_path = "{retrieve_path}"\n'), env=key_env(*emulator.add_key())
    )
    root = f"{gw.web_url}/datastore/{DATASTORE}"
    primary = _instance(SERIES, SOP)
    conflicting = _instance(OTHER_SERIES, OTHER_SOP, "Re-read with another description")
    for name, ds in (("one.dcm", primary), ("two.dcm", conflicting)):
        ds.save_as(tmp_path / name, enforce_file_format=True)
        r = curl("-X", "POST", f"{root}/studies", *SIGV4, "--header", "Accept: application/dicom+json",
                 "--header", "Content-Type: application/dicom", "--upload-file", str(tmp_path / name))
        assert r.status == 200, r.body
        gw.wait_counts(delivered=1 if name == "one.dcm" else 2, timeout=60)
    sets = {s.primary: s.id for s in emulator.image_sets()}
    assert set(sets) == {True, False}
    since = len(emulator.requests)

    # seeds/000 with the primary image set's ID: ELE by default, and HTJ2K RPCL
    frames = f"{root}/studies/{STUDY}/series/{SERIES}/instances/{SOP}/frames/1?imageSetId={sets[True]}"
    r = curl("--request", "GET", frames, *SIGV4, "--header", "x-amz-security-token:dummy", "--header", f"Accept: {ELE}")
    assert r.status == 200, r.body
    (headers, frame), = parse_multipart_related(r.content_type, r.body)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert frame == primary.PixelData
    r = curl("--request", "GET", frames, *SIGV4, "--header", f"Accept: {HTJ2K_RPCL}")
    assert r.status == 200, r.body
    (_, frame), = parse_multipart_related(r.content_type, r.body)
    decoded = decode_frame(frame, "1.2.840.10008.1.2.4.202", PixelDescription.from_dataset(primary))
    assert np.array_equal(decoded, primary.pixel_array)

    # The non-primary instance: invisible without its image set, served with it.
    other = f"{root}/studies/{STUDY}/series/{OTHER_SERIES}/instances/{OTHER_SOP}"
    assert curl(f"{other}/frames/1", "--header", f"Accept: {ELE}").status == 404
    r = curl(f"{other}/frames/1?imageSetId={sets[False]}", "--header", f"Accept: {ELE}")
    assert r.status == 200, r.body
    (_, frame), = parse_multipart_related(r.content_type, r.body)
    assert frame == conflicting.PixelData
    for url in (f"{other}/metadata", f"{root}/studies/{STUDY}/series/{OTHER_SERIES}/metadata", f"{root}/studies/{STUDY}/metadata"):
        r = curl(f"{url}?imageSetId={sets[False]}", "--header", "Accept: application/dicom+json")
        assert r.status == 200, (url, r.body)
        objects = json.loads(r.body)
        assert [o["00080018"]["Value"][0] for o in objects] == [OTHER_SOP]
        assert objects[0]["00081030"]["Value"] == ["Re-read with another description"]
    r = curl(f"{other}?imageSetId={sets[False]}", "--header", "Accept: application/dicom; transfer-syntax=*")
    assert r.status == 200, r.body
    assert r.content_type.startswith("application/dicom")
    r = curl(f"{other}/rendered?imageSetId={sets[False]}", "--header", "Accept: image/png")
    assert r.status == 200 and r.content_type == "image/png"
    other_series = f"{root}/studies/{STUDY}/series/{OTHER_SERIES}"
    r = curl(f"{other_series}/rendered?imageSetId={sets[False]}", "--header", "Accept: image/png")
    assert r.status == 200 and [h["content-location"].split("/")[-2] for h, _ in r.parts()] == [OTHER_SOP]
    r = curl(f"{other_series}/thumbnail?imageSetId={sets[False]}", "--header", "Accept: image/png")
    assert r.status == 200 and r.content_type == "image/png"
    r = curl(f"{other_series}?imageSetId={sets[False]}", "--header", "Accept: multipart/related; type=application/dicom; transfer-syntax=*")
    assert r.status == 200 and len(r.parts()) == 1
    assert _searches(emulator, since) == []  # named image sets are read by ID, never searched for

    # An image set the data store does not have, or one not holding the instance: 404 naming it.
    for url in (f"{frames.split('?')[0]}?imageSetId={UNKNOWN_SET}", f"{frames.split('?')[0]}?imageSetId={sets[False]}"):
        r = curl(url, "--header", f"Accept: {ELE}")
        assert r.status == 404, r.body
        assert "image set" in r.body.decode() and url.rsplit("=", 1)[1] in r.body.decode()
    r = curl(f"{other}?imageSetId={UNKNOWN_SET}", "--header", "Accept: application/dicom; transfer-syntax=*")
    assert r.status == 404 and f"image set {UNKNOWN_SET}" in r.body.decode()
    r = curl(f"{other}/metadata?imageSetId={UNKNOWN_SET}", "--header", "Accept: application/dicom+json")
    assert r.status == 404 and f"image set {UNKNOWN_SET}" in r.body.decode()
    r = curl(f"{other}/metadata?imageSetId=../../x", "--header", "Accept: application/dicom+json")
    assert r.status == 400 and "imageSetId" in r.body.decode()
    # The parameter means nothing outside the HealthImaging-style root.
    r = curl(f"{gw.web_url}/dicom-web/studies/{STUDY}/series/{SERIES}/instances/{SOP}/frames/1?imageSetId={UNKNOWN_SET}",
             "--header", f"Accept: {ELE}")
    assert r.status == 200
