"""An archive outage: everything is acknowledged and spooled, then delivered unattended."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support import dcmtk
from tests.support.ports import wait_until
from tests.support.synth import ct_series


@pytest.mark.slow
def test_orthanc_down_then_up(tmp_path: Path, orthanc, gateway) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    files = ct_series(tmp_path / "ct", 50, rows=128, columns=128)
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    orthanc.stop()

    result = dcmtk.storescu(gw.port, files, gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    # Let the forwarder try and fail before the archive comes back.
    wait_until(lambda: gw.log().count("will be retried") >= 50, 30, 0.1, "no failed delivery attempt")
    counts = gw.counts()
    assert counts["delivered"] == 0 and counts["dead"] == 0
    assert counts["queued"] + counts["sending"] + counts["failed"] == 50
    assert gw.health()["upstream"]["reachable"] is False

    orthanc.start()
    gw.wait_counts(delivered=50, timeout=120)
    assert orthanc.sop_instance_uids() == uids
