"""Several modalities at once: every instance acknowledged, spooled and delivered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.dcmtk import dcmtk_env
from tests.support.ports import wait_until
from tests.support.synth import ct_series


@pytest.mark.slow
def test_concurrent_modalities(tmp_path: Path, orthanc, gateway) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    series = [ct_series(tmp_path / f"m{n}", 50, rows=128, columns=128) for n in range(4)]
    procs = [
        subprocess.Popen(
            ["/usr/bin/storescu", "-aet", f"MODALITY{n}", "-aec", gw.ae_title, "127.0.0.1", str(gw.port)]
            + [str(f) for f in files],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n, files in enumerate(series)
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output
    gw.wait_counts(delivered=200, timeout=120)
    expected = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for files in series for f in files}
    assert orthanc.sop_instance_uids() == expected
    wait_until(lambda: gw.log().count("released: 50 stored, 0 failed") == 4, 10, 0.1, "association summaries")
