"""ack = "delivered", /healthz, and the spool admin commands, against real processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support import dcmtk
from tests.support.corpus import sample_files
from tests.support.ports import closed_port, wait_until
from tests.support.synth import ct_series


def test_echo(gateway) -> None:
    gw = gateway()
    result = dcmtk.echoscu(gw.port, gw.ae_title)
    assert result.returncode == 0, result.stderr
    # The association's summary line is logged once it is closed, which may be just
    # after echoscu has exited.
    wait_until(lambda: "1 echo" in gw.log(), 10, 0.05, "no association summary with the echo")


@pytest.mark.slow
def test_ack_delivered_waits_for_the_archive(tmp_path: Path, orthanc, gateway) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url, dimse={"ack": "delivered", "ack_timeout": 5})
    samples = sample_files()
    result = dcmtk.storescu(gw.port, samples[:1], gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    # Success meant "in the archive": no waiting needed.
    uid = str(dcmread(samples[0], stop_before_pixels=True).SOPInstanceUID)
    assert uid in orthanc.sop_instance_uids()

    orthanc.stop()
    result = dcmtk.storescu(gw.port, samples[1:2], gw.ae_title, extra_args=("-v",))
    assert result.returncode != 0
    assert "Refused: OutOfResources" in result.stderr
    orthanc.start()
    # Still queued: delivered once the archive is back, even though the modality was told no.
    uid2 = str(dcmread(samples[1], stop_before_pixels=True).SOPInstanceUID)
    gw.wait_counts(delivered=2, timeout=60)
    assert uid2 in orthanc.sop_instance_uids()


def test_health_and_spool_cli_on_embedded_archive(gateway) -> None:
    gw = gateway()
    result = dcmtk.storescu(gw.port, sample_files(), gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    gw.wait_counts(delivered=3)
    # The archive probe is cached for a few seconds.
    wait_until(lambda: gw.health()["upstream"]["detail"] == "embedded archive, 3 instances", 15, 0.5)
    health = gw.health()
    assert health["status"] == "ok"
    assert health["upstream"] == {"type": "local", "reachable": True, "detail": "embedded archive, 3 instances"}

    status = json.loads(gw.cli("spool", "status", "--json").stdout)
    assert status["counts"]["delivered"] == 3 and status["bytes"]["delivered"] > 8_000_000
    listing = gw.cli("spool", "list", "--state", "delivered")
    assert listing.returncode == 0 and listing.stdout.count("delivered") == 3
    assert gw.cli("spool", "retry").returncode == 2  # needs --dead or --id
    purge = gw.cli("spool", "purge", "--delivered")
    assert purge.returncode == 0 and "purged 3" in purge.stdout
    # The embedded archive keeps its own links: purging the spool loses nothing.
    gw.stop()
    gw.start()
    assert gw.health()["upstream"]["detail"] == "embedded archive, 3 instances"
    archived = list((gw.spool_dir / "archive" / "objects").rglob("*.dcm"))
    assert len(archived) == 3


def test_dead_instance_can_be_retried(gateway) -> None:
    """An instance out of attempts is dead, shown as such, and requeued on demand.
    (A wrong URL no longer makes instances dead: tests/reliability/test_delivery_faults.py.)"""
    gw = gateway(upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web", spool={"max_attempts": 1})
    result = dcmtk.storescu(gw.port, sample_files()[:1], gw.ae_title)
    assert result.returncode == 0
    gw.wait_counts(dead=1, timeout=30)
    assert gw.health()["status"] == "degraded"
    (row,) = json.loads(gw.cli("spool", "list", "--state", "dead", "--json").stdout)
    assert row["last_error"].startswith("gave up after 1 attempts")
    retried = gw.cli("spool", "retry", "--dead")
    assert "requeued 1" in retried.stdout
    gw.wait_counts(dead=1, timeout=30)  # archive still unreachable: dead again, never lost


def test_dead_instances_are_exported_as_part10_files(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``spool export``: dead instances (their records inside longer preallocated blanks)
    come out as plain Part 10 files dcmdump reads, with the data sets received, 0600 in
    a 0700 directory; nothing is overwritten; the export is audited."""
    audit_file = tmp_path / "audit.log"
    gw = gateway(
        upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web", spool={"max_attempts": 1},
        extra=f'\n[audit]\nfile = "{audit_file}"\n',
    )
    files = ct_series(tmp_path / "ct", 3, rows=64, columns=64)
    assert dcmtk.storescu(gw.port, files, gw.ae_title).returncode == 0
    gw.wait_counts(dead=3, timeout=30)
    out = tmp_path / "exported"
    result = gw.cli("spool", "export", "--dead", "--to", str(out))
    assert result.returncode == 0 and "exported 3 instance(s)" in result.stdout, result.stdout + result.stderr
    assert out.stat().st_mode & 0o777 == 0o700
    for original in files:
        sent = dcmread(original)
        exported = out / f"{sent.SOPInstanceUID}.dcm"
        assert exported.stat().st_mode & 0o777 == 0o600
        assert subprocess.run(["/usr/bin/dcmdump", "-q", str(exported)], capture_output=True).returncode == 0
        got = dcmread(exported)
        assert got.PixelData == sent.PixelData and got.PatientID == sent.PatientID and got.SOPInstanceUID == sent.SOPInstanceUID
    again = gw.cli("spool", "export", "--study", str(dcmread(files[0]).StudyInstanceUID), "--to", str(out))
    assert again.returncode == 1 and again.stderr.count("exists already") == 3
    assert gw.cli("spool", "export", "--to", str(out)).returncode == 2  # no selection
    blocked = gw.cli("spool", "export", "--dead", "--to", str(audit_file / "sub"))  # a file where the directory goes
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr and "Not a directory" in blocked.stderr
    assert "spool export to" in audit_file.read_text()


def test_sigterm_stops_cleanly(gateway) -> None:
    gw = gateway()
    assert gw.stop() == 0
    assert "stopped" in gw.log()
