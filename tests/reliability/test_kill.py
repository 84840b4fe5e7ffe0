"""SIGKILL in the middle of a send: every acknowledged instance still reaches the archive."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.dcmtk import StoreSCP, dcmtk_env
from tests.support.ports import wait_until
from tests.support.synth import ct_series


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files storescu saw a Success response for, from its -v log."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            current = m.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


@pytest.mark.slow
def test_sigkill_mid_send_loses_nothing(tmp_path: Path, orthanc, gateway) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    files = ct_series(tmp_path / "ct", 200)
    proc = subprocess.Popen(
        ["/usr/bin/storescu", "-v", "-aet", "MODALITY", "-aec", gw.ae_title, "127.0.0.1", str(gw.port)]
        + [str(f) for f in files],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dcmtk_env(),
    )
    spool_db = gw.spool_dir / "spool.sqlite"
    wait_until(lambda: spool_db.exists(), 20, 0.01, "spool never created")

    def spooled() -> int:
        c = gw.counts()
        return sum(c.values())

    wait_until(lambda: spooled() >= 40, 60, 0.005, "gateway never received 40 instances")
    gw.proc.kill()  # SIGKILL: no shutdown code runs
    gw.proc.wait()
    output, _ = proc.communicate(timeout=60)
    acked = acknowledged_files(output)
    assert 40 <= len(acked) < 200, output[-2000:]

    gw.start()
    acked_uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in acked}

    def all_arrived() -> bool:
        return acked_uids <= orthanc.sop_instance_uids()

    wait_until(all_arrived, 120, 0.5, "acknowledged instances missing from Orthanc")
    # Orthanc holds a batch a moment before the gateway has read its answer and marked
    # it delivered (a full run once looked in that moment: 32 'sending'); the spool must
    # then settle with nothing left sending or queued, and nothing dead.
    wait_until(lambda: (c := gw.counts())["sending"] + c["queued"] == 0, 60, 0.1, "instances left in the spool")
    assert gw.counts()["dead"] == 0
    # Nothing half-written survives in the spool.
    assert not any((gw.spool_dir / "incoming").iterdir())


@pytest.mark.slow
def test_sigkill_mid_send_loses_no_routed_copy(tmp_path: Path, gateway) -> None:
    """The same kill with a route copying everything to a storescp: after the restart
    every acknowledged instance reaches the destination too, whole."""
    with StoreSCP(tmp_path / "dest", ae_title="DEST") as dest:
        gw = gateway(extra=f'\n[[dimse.peers]]\nae_title = "DEST"\nhost = "127.0.0.1"\nport = {dest.port}\n'
                     '\n[[dimse.routes]]\ndestination = "DEST"\n')
        files = ct_series(tmp_path / "ct", 200)
        proc = subprocess.Popen(
            ["/usr/bin/storescu", "-v", "-aet", "MODALITY", "-aec", gw.ae_title, "127.0.0.1", str(gw.port)]
            + [str(f) for f in files],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env(),
        )
        wait_until(lambda: (gw.spool_dir / "spool.sqlite").exists(), 20, 0.01, "spool never created")
        wait_until(lambda: sum(gw.counts().values()) >= 40, 60, 0.005, "gateway never received 40 instances")
        gw.proc.kill()
        gw.proc.wait()
        output, _ = proc.communicate(timeout=60)
        acked = acknowledged_files(output)
        assert 40 <= len(acked) < 200, output[-2000:]

        gw.start()
        expected = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): Path(f) for f in acked}
        wait_until(lambda: len(dest.files()) >= len(expected), 120, 0.5, "copies missing at the destination")
        at_dest = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in dest.wait_for_files(len(expected))}
        assert set(expected) <= set(at_dest)
        for uid, sent in expected.items():
            assert dcmread(at_dest[uid]).PixelData == dcmread(sent).PixelData
        # storescp writes each file before its C-STORE-RSP reaches the gateway, which
        # then marks the copy sent: as in the test above, the spool must settle.
        route = lambda: gw.health()["spool"]["routes"]["DEST"]["counts"]  # noqa: E731
        wait_until(lambda: route()["sending"] == 0, 60, 0.1, "route copies left sending")
        assert route()["dead"] == 0
