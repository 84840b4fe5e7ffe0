"""The AWS HealthImaging curl examples (seeds/000 frames, seeds/001 STOW) against an open
facade under ``/datastore/{id}``, over the embedded archive and over Orthanc.

They run as the vendor wrote them (line breaks restored, BSD ``stat -f%z`` as GNU
``stat -c%s``), with only the host changed: ``--aws-sigv4`` with the documentation's
dummy keys signs requests the open facade does not need to check, and the instances
carry the UIDs the examples name.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from gateway.codecs.description import PixelDescription
from gateway.codecs.frames import decode_frame
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc, parse_multipart_related

DATASTORE = "d9a2a515ab294163a2d2f4069eed584c"
STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826285059.5457"
SERIES = "1.3.6.1.4.1.5962.1.3.4.1.20040825185059.5457"
SOP = "1.3.6.1.4.1.5962.1.1.4.1.1.20040826186059.5457"
SIGV4 = ("--aws-sigv4", "aws:amz:us-east-1:medical-imaging", "--user", "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")

# seeds/001 example 3, as the vendor wrote it (host and stat flag changed)
MULTIPART_SCRIPT = r"""#!/bin/sh
FILENAME=multipart.payload
BOUNDARY=2a8a02b9-0ed3-c8a7-7ebd-232427531940
boundary_str="--$BOUNDARY\r\n"
mp_header="${boundary_str}Content-Type: application/dicom\r\n\r\n"
##Encapsulate the binary DICOM file 1.
printf '%b' "$mp_header" > $FILENAME
cat file1.dcm >> $FILENAME
##Encapsulate the binary DICOM file 2 (note the additional CRLF before the part header).
printf '%b' "\r\n$mp_header" >> $FILENAME
cat file2.dcm >> $FILENAME
## Add the closing boundary.
printf '%b' "\r\n--$BOUNDARY--" >> $FILENAME
## Obain the payload size in bytes.
multipart_payload_size=$(stat -c%s "$FILENAME")
# Execute CURL POST request with AWS SIGv4
curl -X POST -v \
  "$GW/datastore/b5f34e91ca734b39a54ac11ea42416cf/studies" \
  --aws-sigv4 "aws:amz:us-east-1:medical-imaging" \
  --user "AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY" \
  --header "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD" \
  --header "x-amz-decoded-content-length: ${multipart_payload_size}" \
  --header 'Accept: application/dicom+json' \
  --header "Content-Type: multipart/related; type=\"application/dicom\"; boundary=\"${BOUNDARY}\"" \
  --data-binary "@$FILENAME" -o answer.json -w '%{http_code}' > status.txt
# Delete the payload file
rm $FILENAME
"""


def _instance(path: Path, study: str, series: str, sop: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientID = "HI-1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture(params=["local", "orthanc"])
def open_facade(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Gateway]:
    orthanc = Orthanc(workdir=tmp_path / "orthanc").start() if request.param == "orthanc" else None
    gw = Gateway(tmp_path / "gw", upstream_url=orthanc.dicomweb_url if orthanc else None)
    try:
        yield gw.start()
    finally:
        gw.kill()
        if orthanc is not None:
            orthanc.cleanup()


@pytest.mark.slow
def test_healthimaging_store_and_frames_examples(open_facade: Gateway, tmp_path: Path) -> None:
    gw = open_facade
    root = f"{gw.web_url}/datastore/{DATASTORE}"
    amz = ("--header", "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
    # Example 1, StoreDICOM: one P10 file
    ds = _instance(tmp_path / "one.dcm", STUDY, SERIES, SOP)
    size = (tmp_path / "one.dcm").stat().st_size
    r = curl("-X", "POST", f"{root}/studies", *SIGV4, *amz, "--header", f"x-amz-decoded-content-length: {size}",
             "--header", "Accept: application/dicom+json", "--header", "Content-Type: application/dicom",
             "--upload-file", str(tmp_path / "one.dcm"))
    assert r.status == 200, r.body
    # Example 2, StoreDICOMStudy: the instance must belong to the study in the path
    _instance(tmp_path / "two.dcm", STUDY, SERIES, pydicom.uid.generate_uid())
    r = curl("-X", "POST", f"{root}/studies/{STUDY}", *SIGV4, *amz,
             "--header", "Accept: application/dicom+json", "--header", "Content-Type: application/dicom",
             "--upload-file", str(tmp_path / "two.dcm"))
    assert r.status == 200, r.body
    _instance(tmp_path / "stray.dcm", pydicom.uid.generate_uid(), SERIES, pydicom.uid.generate_uid())
    r = curl("-X", "POST", f"{root}/studies/{STUDY}", *SIGV4, *amz, "--header", "Content-Type: application/dicom",
             "--upload-file", str(tmp_path / "stray.dcm"))
    assert r.status == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    # Example 3: the hand-built multipart body of two files
    work = tmp_path / "script"
    work.mkdir()
    _instance(work / "file1.dcm", STUDY, SERIES, pydicom.uid.generate_uid())
    _instance(work / "file2.dcm", STUDY, SERIES, pydicom.uid.generate_uid())
    (work / "store.sh").write_text(MULTIPART_SCRIPT)
    subprocess.run(["/bin/sh", "store.sh"], cwd=work, env={**os.environ, "GW": gw.web_url}, check=True, capture_output=True, timeout=60)
    assert (work / "status.txt").read_text() == "200"
    assert not (work / "multipart.payload").exists()
    gw.wait_counts(delivered=4)

    # seeds/000: frames, ELE by default, and the HTJ2K RPCL syntax HealthImaging serves
    frames = f"{root}/studies/{STUDY}/series/{SERIES}/instances/{SOP}/frames/1?imageSetId=459e50687f121185f747b67bb60d1bc8"
    r = curl("--request", "GET", frames, *SIGV4, "--header", "x-amz-security-token:dummy",
             "--header", "Accept: multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1")
    assert r.status == 200
    (headers, frame), = parse_multipart_related(r.content_type, r.body)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    assert frame == ds.PixelData
    r = curl("--request", "GET", frames, *SIGV4,
             "--header", "Accept: multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.202")
    assert r.status == 200
    (headers, frame), = parse_multipart_related(r.content_type, r.body)
    assert headers["content-type"] == "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.4.202"
    decoded = decode_frame(frame, "1.2.840.10008.1.2.4.202", PixelDescription.from_dataset(ds))
    assert np.array_equal(decoded, ds.pixel_array)
