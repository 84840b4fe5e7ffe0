"""The facade over an archive that cannot retrieve whole studies or series, nor frames
(HealthImaging-like `Capabilities`), in front of a real Orthanc: studies and series
still stream whole, fetched instance by instance from the listing, and frames are cut
out of the instance. The app runs in process on a real socket; the client is aiohttp."""

from __future__ import annotations

import asyncio
from io import BytesIO
from pathlib import Path

import aiohttp
import numpy as np
import pydicom
from aiohttp import web
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from gateway.config import parse_config
from gateway.retrieval.engine import Retriever
from gateway.spool.queue import Spool
from gateway.upstream.base import Capabilities
from gateway.upstream.dicomweb import DicomWebUpstream
from gateway.web.app import create_app
from tests.support.orthanc import Orthanc, parse_multipart_related
from tests.support.ports import free_port


def _series(directory: Path, count: int) -> tuple[str, str, list[pydicom.Dataset]]:
    study, series = generate_uid(), generate_uid()
    out = []
    for n in range(count):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(directory / f"{n}.dcm", enforce_file_format=True)
        out.append(ds)
    return study, series, out


def test_no_bulk_retrieve_nor_frames_upstream(orthanc: Orthanc, tmp_path: Path) -> None:
    study, series, datasets = _series(tmp_path, 3)
    orthanc.upload(sorted(tmp_path.glob("*.dcm")))
    config = parse_config(
        {"spool": {"directory": str(tmp_path / "spool")}, "upstream": {"type": "dicomweb", "url": orthanc.dicomweb_url}}
    )
    caps = Capabilities(study_retrieve=False, series_retrieve=False, frames=False, delete=None)

    async def go() -> None:
        upstream = DicomWebUpstream(config.upstream, capabilities=caps)
        await upstream.start()
        spool = Spool(config.spool)
        retriever = Retriever(config, upstream)
        runner = web.AppRunner(create_app(config, spool, upstream, retriever))
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        base = f"http://127.0.0.1:{port}/dicom-web/studies/{study}"
        try:
            async with aiohttp.ClientSession() as client:
                accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
                for url in (base, f"{base}/series/{series}"):
                    async with client.get(url, headers=accept) as resp:
                        assert resp.status == 200
                        parts = parse_multipart_related(resp.headers["Content-Type"], await resp.read())
                    got = {pydicom.dcmread(BytesIO(body)).SOPInstanceUID for _, body in parts}
                    assert got == {ds.SOPInstanceUID for ds in datasets}
                ds = datasets[1]
                frames = f"{base}/series/{series}/instances/{ds.SOPInstanceUID}/frames/1"
                async with client.get(frames, headers={"Accept": "multipart/related; type=application/octet-stream"}) as resp:
                    assert resp.status == 200
                    ((headers, frame),) = parse_multipart_related(resp.headers["Content-Type"], await resp.read())
                assert np.array_equal(np.frombuffer(frame, "<i2").reshape(128, 128), ds.pixel_array)
        finally:
            await runner.cleanup()
            retriever.close()
            await upstream.close()
            spool.close()

    asyncio.run(go())
