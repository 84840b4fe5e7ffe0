"""DELETE through the facade takes what the spool still holds, not only the archive's copy.

The gateway acknowledges an instance before the archive has it. Here the embedded
archive's disk is full, so a series sent meanwhile waits in the spool, acknowledged.
A DELETE that reached only the archive answered 404 and left those instances queued:
once the disk had room again they were delivered, and the deleted series came back.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from pydicom import dcmread

from tests.reliability.test_disk_faults import fill_completely, small_fs  # noqa: F401 - fixture
from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.ports import wait_until
from tests.support.synth import ct_series

JSON = ("-H", "Accept: application/dicom+json")


def uids_of(files: list[Path]) -> tuple[str, str, list[str]]:
    """Study, series and SOP Instance UIDs of one series' files."""
    headers = [dcmread(f, stop_before_pixels=True) for f in files]
    return str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID), [str(h.SOPInstanceUID) for h in headers]


def test_a_delete_withdraws_what_the_spool_has_not_delivered_yet(tmp_path: Path, small_fs: Path, gateway) -> None:  # noqa: F811
    spool = tmp_path / "spool"
    (spool / "archive").mkdir(parents=True)
    archive_fs = small_fs
    # the embedded archive lives on the small file system, the spool beside it
    subprocess.run(["/usr/bin/mount", "--bind", str(archive_fs), str(spool / "archive")], check=True)
    gw = None
    try:
        gw = gateway(spool_dir=spool)
        kept = ct_series(tmp_path / "kept", 3, rows=32, columns=32)
        study, _, kept_uids = uids_of(kept)
        assert dcmtk.storescu(gw.port, kept, gw.ae_title).returncode == 0
        gw.wait_counts(delivered=3, timeout=30)

        filler = fill_completely(archive_fs / "filler")
        late = ct_series(tmp_path / "late", 3, rows=32, columns=32, study_uid=study)
        _, late_series, late_uids = uids_of(late)
        other = ct_series(tmp_path / "other", 2, rows=32, columns=32)
        other_study, other_series, other_uids = uids_of(other)
        assert dcmtk.storescu(gw.port, late + other, gw.ae_title).returncode == 0
        wait_until(lambda: gw.counts()["failed"] == 5, 30, 0.2, "deliveries not failing on the full disk")

        base = f"{gw.web_url}/dicom-web"
        # a series only the spool holds: withdrawn, 204
        assert curl("-X", "DELETE", f"{base}/studies/{study}/series/{late_series}").status == 204
        # one instance only the spool holds: withdrawn alone
        gone = f"{base}/studies/{other_study}/series/{other_series}/instances/{other_uids[0]}"
        assert curl("-X", "DELETE", gone).status == 204
        # what neither holds: 404
        assert curl("-X", "DELETE", f"{base}/studies/{study}/series/{late_series}").status == 404
        rows = json.loads(gw.cli("spool", "list", "--limit", "100", "--json").stdout)
        assert sorted(r["sop_instance_uid"] for r in rows if r["state"] != "delivered") == [other_uids[1]]

        filler.unlink()
        gw.wait_counts(delivered=4, timeout=30)
        found = curl(f"{base}/studies/{study}/instances", *JSON).json()
        assert sorted(a["00080018"]["Value"][0] for a in found) == sorted(kept_uids)
        found = curl(f"{base}/studies/{other_study}/instances", *JSON).json()
        assert [a["00080018"]["Value"][0] for a in found] == [other_uids[1]]

        # a study the archive holds: deleted there
        assert curl("-X", "DELETE", f"{base}/studies/{study}").status == 204
        assert curl(f"{base}/studies?StudyInstanceUID={study}", *JSON).json() == []
        log = gw.log()
        assert "3 undelivered instance(s) withdrawn from the spool" in log, log[-2000:]
    finally:
        if gw is not None:
            gw.kill()
        subprocess.run(["/usr/bin/umount", "-l", str(spool / "archive")], check=False)
