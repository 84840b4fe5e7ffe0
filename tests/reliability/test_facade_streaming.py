"""A series retrieve streams: the first bytes leave at once and the daemon's peak memory
grows by a fraction of the answer's size, over the embedded archive and over Orthanc."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

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
