"""An archive outage: everything is acknowledged and spooled, then delivered unattended."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support import dcmtk
from tests.support.daemon import Gateway
from tests.support.ports import free_port
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
    wait_until(lambda: all(r["attempts"] >= 1 for r in spool_rows(gw)), 30, 0.1, "no failed delivery attempt")
    counts = gw.counts()
    assert counts["delivered"] == 0 and counts["dead"] == 0
    assert counts["queued"] + counts["sending"] + counts["failed"] == 50
    assert gw.health()["upstream"]["reachable"] is False

    orthanc.start()
    gw.wait_counts(delivered=50, timeout=120)
    assert orthanc.sop_instance_uids() == uids


def spool_rows(gw: Gateway) -> list[dict]:
    return json.loads(gw.cli("spool", "list", "--limit", "1000", "--json").stdout)


def test_an_outage_is_said_in_a_few_lines_not_one_per_instance_and_attempt(tmp_path: Path, gateway) -> None:
    """Through an outage every queued instance fails again at each of its retries. A
    WARNING per instance and attempt was some 3,500 lines in 30 s for 300 instances
    (tens of thousands a day at the default pauses), burying everything else; now one
    line per batch, at most ten a minute, naming the study, the spool ids and the
    reason. Each instance's attempts stay in `spool list`."""
    gw = gateway(
        upstream_url=f"http://127.0.0.1:{free_port()}/dicom-web",
        spool={"retry_base_seconds": 0.05, "retry_max_seconds": 0.2, "max_attempts": 1000},
    )
    files = ct_series(tmp_path / "ct", 300, rows=16, columns=16)
    study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert dcmtk.storescu(gw.port, files, gw.ae_title).returncode == 0
    wait_until(lambda: all(r["attempts"] >= 5 for r in spool_rows(gw)), 60, 0.5, "instances not retried")
    rows = spool_rows(gw)
    assert len(rows) == 300 and all("archive unreachable" in r["last_error"] for r in rows)
    said = [line for line in gw.log().splitlines() if "will be retried" in line]
    assert 1 <= len(said) <= 10, len(said)
    assert f"of study {study} will be retried (spool ids " in said[0] and "archive unreachable" in said[0], said[0]
