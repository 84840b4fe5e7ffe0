"""A series retrieve streams: the first bytes leave at once and the daemon's peak memory
grows by a fraction of the answer's size, over the embedded archive and over Orthanc."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.support import dcmtk
from tests.support.curl import CURL
from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc
from tests.support.synth import ct_series

COUNT = 160  # x 512 KiB: an 80 MiB answer


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(params=["local", "orthanc"])
def loaded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, list[Path]]]:
    files = ct_series(tmp_path / "ct", COUNT)
    orthanc = None
    if request.param == "orthanc":
        orthanc = Orthanc(workdir=tmp_path / "orthanc").start()
        orthanc.upload(files)
    gw = Gateway(tmp_path / "gw", upstream_url=orthanc.dicomweb_url if orthanc else None)
    try:
        gw.start()
        if orthanc is None:
            result = dcmtk.storescu(gw.port, files, gw.ae_title)
            assert result.returncode == 0, result.stdout + result.stderr
            gw.wait_counts(delivered=COUNT, timeout=120)
        yield gw, files
    finally:
        gw.kill()
        if orthanc is not None:
            orthanc.cleanup()


@pytest.mark.slow
def test_a_series_retrieve_streams(loaded: tuple[Gateway, list[Path]], tmp_path: Path) -> None:
    gw, files = loaded
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert gw.proc is not None
    before = peak_rss_mb(gw.proc.pid)
    out = tmp_path / "series.multipart"
    result = subprocess.run(
        [CURL, "-sS", "-o", str(out), "-w", "%{http_code} %{time_starttransfer} %{size_download}",
         "--header", 'Accept: multipart/related; type="application/dicom"; transfer-syntax=*',
         f"{gw.web_url}/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"],
        capture_output=True, text=True, timeout=120,
    )
    status, first_byte, size = result.stdout.split()
    assert status == "200", result.stderr
    total = sum(f.stat().st_size for f in files)
    assert int(size) > total
    assert float(first_byte) < 1.0
    assert out.read_bytes().count(b"Content-Type: application/dicom; transfer-syntax=") == COUNT
    grown = peak_rss_mb(gw.proc.pid) - before
    assert grown < total / 2**20 / 4, f"peak RSS grew by {grown:.0f} MiB for a {total / 2**20:.0f} MiB answer"


def _frames(first: int, end: int) -> bytes:
    """Frames ``first`` to ``end`` (exclusive): each pixel its index, wrapped at 16 bits."""
    return (np.arange(first * 512 * 512, end * 512 * 512, dtype=np.uint64) % 65521).astype("<u2").tobytes()


def _native_multiframe(path: Path, frames: int) -> pydicom.Dataset:
    """A native 512x512 16-bit multi-frame instance (512 KiB a frame)."""
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
    ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = _frames(0, frames)
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.mark.slow
def test_every_frame_of_a_large_instance_streams_and_a_repeated_frame_is_refused(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """All 320 frames (160 MiB) of a native multi-frame instance in one request: the
    daemon's peak memory grows by a fraction of that (on the code before, every frame
    asked was read before the first was sent: +500 MiB for a 500 MiB instance). A frame
    list repeating one frame is refused, as PS3.18 allows no duplicates: 2,000 times
    frame 1 in a 4 KB URL had the daemon hold 1 GB."""
    frames = 320
    ds = _native_multiframe(tmp_path / "multiframe.dcm", frames)
    gw = gateway()
    assert dcmtk.storescu(gw.port, [tmp_path / "multiframe.dcm"], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1, timeout=60)
    before = peak_rss_mb(gw.proc.pid)
    url = f"{gw.web_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/"
    out = tmp_path / "frames.multipart"
    result = subprocess.run(
        [CURL, "-sS", "-o", str(out), "-w", "%{http_code} %{size_download}",
         "--header", "Accept: multipart/related; type=application/octet-stream; transfer-syntax=*",
         url + ",".join(str(n) for n in range(1, frames + 1))],
        capture_output=True, text=True, timeout=120,
    )
    status, size = result.stdout.split()
    assert status == "200" and int(size) > frames * 512 * 1024, result.stdout + result.stderr
    body = out.read_bytes()
    last = _frames(frames - 1, frames)
    assert body.count(b"Content-Type: application/octet-stream; transfer-syntax=") == frames and last in body
    grown = peak_rss_mb(gw.proc.pid) - before
    assert grown < frames / 2 / 2, f"peak RSS grew by {grown:.0f} MiB for {frames / 2:.0f} MiB of frames"

    repeated = subprocess.run(
        [CURL, "-sS", "-w", "\n%{http_code}", url + ",".join(["1"] * 2000)], capture_output=True, text=True, timeout=60
    )
    assert repeated.stdout.split("\n") == ["a frame number is repeated; each frame is asked once", "", "400"], repeated.stdout
    assert peak_rss_mb(gw.proc.pid) - before < frames / 2 / 2
