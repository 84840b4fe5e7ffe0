"""C-MOVE and C-GET from HealthImaging under its quotas, with the emulator's scaled down (10
GetDICOMInstance/s and 10 GetImageFrame/s, bursts of 20) so a 40-instance move,
fetched eight at a time, would outrun them on either retrieve path: the client-side
bucket keeps the gateway under them, and where a 429 happens all the same (the
bucket set above the quota, as when other clients share the account's) the read is
retried with backoff; either way every instance arrives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from tests.healthimaging.test_daemon import healthimaging_upstream, key_env
from tests.support.dcmtk import StoreSCP, getscu, movescu, storescu
from tests.support.healthimaging import Emulator, throttle
from tests.support.synth import ct_series

COUNT = 40
QUOTA_SCALE = 0.2  # GetDICOMInstance: 10/s, burst 20
QUOTAS = {op: (rate * QUOTA_SCALE, burst * QUOTA_SCALE) for op, (rate, burst) in throttle.QUOTAS.items()} | {
    "GetImageFrame": (10, 20)
}
READS = {"dicomweb": "GetDICOMInstance", "frames": "GetImageFrame"}  # the read per instance of each path


@pytest.fixture
def throttled() -> Iterator[Emulator]:
    server = Emulator(quotas=QUOTAS).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StoreSCP]:
    server = StoreSCP(output_dir=tmp_path / "received", ae_title="DEST").start()
    try:
        yield server
    finally:
        server.cleanup()


def move_series(emulator: Emulator, scp: StoreSCP, gateway: Any, tmp_path: Path, path: str, rate: float) -> Any:
    """Store a COUNT-instance series through the gateway, move it to ``scp`` by the
    retrieve ``path`` with the bucket of its read at ``rate``/s; check every instance
    arrived intact."""
    paths = ct_series(tmp_path / "series", COUNT, rows=32, columns=32)
    peers = f'\n[[dimse.peers]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {scp.port}\n'
    upstream = healthimaging_upstream(emulator, f'retrieve_path = "{path}"\n\n[upstream.rate_limits]\n{READS[path]} = {rate}\n')
    gw = gateway(upstream=upstream, env=key_env(*emulator.add_key()), extra=peers)
    assert storescu(gw.port, paths, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=COUNT, timeout=60)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": first.StudyInstanceUID, "SeriesInstanceUID": first.SeriesInstanceUID}
    result = movescu(gw.port, gw.ae_title, "DEST", keys, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    received = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in scp.wait_for_files(COUNT, timeout=60))}
    for sent_path in paths:
        sent = pydicom.dcmread(sent_path)
        assert np.array_equal(received[str(sent.SOPInstanceUID)].pixel_array, sent.pixel_array)
    return gw


@pytest.mark.slow
@pytest.mark.parametrize("path", list(READS))
def test_the_client_side_bucket_keeps_a_move_under_the_quota(
    throttled: Emulator, scp: StoreSCP, gateway: Any, tmp_path: Path, path: str
) -> None:
    move_series(throttled, scp, gateway, tmp_path, path, rate=8)
    fetched = [r for r in throttled.requests if r.operation == READS[path]]
    assert len(fetched) == COUNT and all(r.status == 200 for r in fetched)
    assert throttled.throttle.refused == {}
    assert not throttled.refusals()


@pytest.mark.slow
@pytest.mark.parametrize("path", list(READS))
def test_a_throttled_read_is_retried_and_the_move_completes(
    throttled: Emulator, scp: StoreSCP, gateway: Any, tmp_path: Path, path: str
) -> None:
    gw = move_series(throttled, scp, gateway, tmp_path, path, rate=1000)
    fetched = [r for r in throttled.requests if r.operation == READS[path]]
    throttled_reads = [r for r in fetched if r.status == 429]
    assert throttled_reads and all(r.error_type == "ThrottlingException" for r in throttled_reads)
    assert len([r for r in fetched if r.status == 200]) == COUNT
    if path == "dicomweb":  # botocore retries GetImageFrame's 429s itself, then so do we
        assert "GetDICOMInstance failed transiently" in gw.log()
    assert not throttled.refusals()


@pytest.mark.slow
def test_a_throttled_c_get_is_retried_and_completes(throttled: Emulator, gateway: Any, tmp_path: Path) -> None:
    """C-GET reads through the same path: throttled GetDICOMInstance reads are retried
    and every instance comes back on the association."""
    paths = ct_series(tmp_path / "series", COUNT, rows=32, columns=32)
    upstream = healthimaging_upstream(throttled, 'retrieve_path = "dicomweb"\n\n[upstream.rate_limits]\nGetDICOMInstance = 1000\n')
    gw = gateway(upstream=upstream, env=key_env(*throttled.add_key()))
    assert storescu(gw.port, paths, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=COUNT, timeout=60)
    study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    out = tmp_path / "got"
    out.mkdir()
    result = getscu(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, out)
    assert result.returncode == 0, result.stdout + result.stderr
    got = {str(pydicom.dcmread(p).SOPInstanceUID) for p in out.iterdir()}
    assert got == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    fetched = [r for r in throttled.requests if r.operation == "GetDICOMInstance"]
    assert [r for r in fetched if r.status == 429] and len([r for r in fetched if r.status == 200]) == COUNT
