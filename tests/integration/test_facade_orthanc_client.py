"""Orthanc's DICOMweb plugin as a client of the facade (``DicomWeb.Servers``).

A second Orthanc lists the gateway as DICOMweb server ``gw`` (with the bearer token
in ``HttpHeaders``) and uses its own ``/dicom-web/servers/gw/qido``, ``/retrieve`` (a
study pulled into that Orthanc arrives whole) and ``/stow`` (a study pushed lands in
the gateway's upstream), over the embedded archive and over a first Orthanc.
"""

from __future__ import annotations

import json
from io import BytesIO
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc
from tests.support.ports import wait_until

TOKEN = "orthanc-client-token"


@pytest.fixture(params=["local", "orthanc"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Orthanc | None, Orthanc]]:
    archive = Orthanc(workdir=tmp_path / "archive").start() if request.param == "orthanc" else None
    gw = Gateway(tmp_path / "gw", upstream_url=archive.dicomweb_url if archive else None, http_auth={"bearer_tokens": [TOKEN]})
    client = None
    try:
        gw.start()
        client = Orthanc(
            workdir=tmp_path / "client",
            extra_config={
                "DicomWeb": {
                    "Enable": True,
                    "Root": "/dicom-web/",
                    "Servers": {
                        "gw": {"Url": f"{gw.web_url}/dicom-web/", "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}}
                    },
                }
            },
        ).start()
        yield gw, archive, client
    finally:
        gw.kill()
        for server in (client, archive):
            if server is not None:
                server.cleanup()


def _study(directory: Path, count: int) -> tuple[str, list[Path]]:
    study = generate_uid()
    series = generate_uid()
    paths = []
    for n in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "OC-1", study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        paths.append(directory / f"i{n}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return study, paths


@pytest.mark.slow
def test_orthanc_pulls_and_pushes_through_the_facade(setup: tuple[Gateway, Orthanc | None, Orthanc], tmp_path: Path) -> None:
    gw, archive, client = setup
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    study, paths = _study(tmp_path / "a", 3)
    # load the archive through the facade: the client pushes the study (the embedded archive has no other door)
    client.upload(paths)
    answer = client.post_json("/dicom-web/servers/gw/stow", {"Resources": [client.get_json("/studies")[0]]})
    assert answer is not None
    gw.wait_counts(delivered=3)
    if archive is not None:
        assert archive.instance_count() == 3
    client.clear()

    found = client.post_json("/dicom-web/servers/gw/qido", {"Uri": "/studies", "Arguments": {"StudyInstanceUID": study}})
    # Orthanc hands the answer back in its own shape: each Value a plain string
    assert [s["0020000D"]["Value"] for s in found] == [study]
    found = client.post_json("/dicom-web/servers/gw/qido", {"Uri": f"/studies/{study}/instances"})
    assert len(found) == 3

    client.post_json("/dicom-web/servers/gw/retrieve", {"Resources": [{"Study": study}]})
    wait_until(lambda: client.instance_count() == 3, 30, 0.2, "the pulled study never arrived whole")
    originals = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    assert client.sop_instance_uids() == set(originals)
    for uid, ds in originals.items():
        got = pydicom.dcmread(BytesIO(client.get_instance_bytes(uid)))
        assert got.pixel_array.tolist() == ds.pixel_array.tolist()

    # push a second study from the client: it lands upstream
    second, more = _study(tmp_path / "b", 2)
    client.upload(more)
    ids = [s for s in client.get_json("/studies") if client.get_json(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"] == second]
    answer = client.post_json("/dicom-web/servers/gw/stow", {"Resources": ids})
    gw.wait_counts(delivered=5)
    if archive is not None:
        assert {pydicom.dcmread(p).SOPInstanceUID for p in more} <= archive.sop_instance_uids()
    found = client.post_json("/dicom-web/servers/gw/qido", {"Uri": f"/studies/{second}/instances"})
    assert len(found) == 2, json.dumps(found)[:300]
