"""Where is my study: `dicom-gateway study` and the spool filters, against real
processes (storescu as two modalities, the daemon, Orthanc or the embedded archive)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support import dcmtk
from tests.support.audit_messages import event_of, file_messages
from tests.support.daemon import REPO
from tests.support.ports import closed_port, wait_until
from tests.support.synth import ct_series


def uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def store(gw, paths: list[Path], calling_ae: str) -> None:
    result = dcmtk.storescu(gw.port, paths, gw.ae_title, calling_ae=calling_ae)
    assert result.returncode == 0, result.stdout + result.stderr


def dead_studies(tmp_path: Path, gateway, count: int) -> tuple:  # type: ignore[no-untyped-def]
    """A gateway whose archive is unreachable, holding a study of ``count`` instances
    and another of one, all dead after their one attempt."""
    gw = gateway(upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web", spool={"max_attempts": 1})
    first = ct_series(tmp_path / "first", count, 32, 32)
    other = ct_series(tmp_path / "other", 1, 32, 32)
    store(gw, first + other, "CT01")
    gw.wait_counts(dead=count + 1, timeout=30)
    return gw, first, other


def test_study_report_and_filters_on_the_embedded_archive(tmp_path: Path, gateway) -> None:
    gw = gateway()
    study_uid = "1.2.826.0.1.3680043.8.498.4242"
    first = ct_series(tmp_path / "a", 3, 32, 32, study_uid=study_uid)
    second = ct_series(tmp_path / "b", 2, 32, 32, study_uid=study_uid)
    other = ct_series(tmp_path / "c", 1, 32, 32)
    store(gw, first + second[:1], "CT01")
    store(gw, second[1:] + other, "MR01")
    gw.wait_counts(delivered=6)

    result = gw.cli("study", study_uid, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["archive"] == {"error": None, "series": 2, "instances": 5}
    rows = {row["series_uid"]: row for row in data["series"]}
    a, b = rows[uids(first[0])[1]], rows[uids(second[0])[1]]
    assert [row["series_uid"] for row in data["series"]] == [uids(first[0])[1], uids(second[0])[1]]
    assert a["instances"] == 3 and a["states"]["delivered"] == 3 and a["archive_instances"] == 3
    assert a["calling_aes"] == {"CT01": 3} and a["modality"] == "CT"
    assert b["states"]["delivered"] == 2 and b["archive_instances"] == 2
    assert b["calling_aes"] == {"CT01": 1, "MR01": 1}
    assert a["first_received"] <= a["last_received"] <= a["last_delivered"]

    text = gw.cli("study", study_uid)
    assert text.returncode == 0
    assert uids(first[0])[1] in text.stdout and "from CT01 (1), MR01 (1)" in text.stdout
    assert "archive (local): 5 instances in 2 series" in text.stdout

    unknown = gw.cli("study", "1.2.3.999")
    assert unknown.returncode == 0 and "neither the spool nor the archive holds any instance" in unknown.stdout
    bad = gw.cli("study", "../../etc")
    assert bad.returncode == 2 and "not a UID" in bad.stderr

    def listed(*args: str) -> list[dict]:
        out = gw.cli("spool", "list", "--json", *args)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert len(listed("--study", study_uid)) == 5
    assert {r["sop_instance_uid"] for r in listed("--series", uids(second[0])[1])} == {uids(p)[2] for p in second}
    assert [r["sop_instance_uid"] for r in listed("--instance", uids(other[0])[2])] == [uids(other[0])[2]]
    assert len(listed("--calling-ae", "MR01")) == 2
    assert len(listed("--calling-ae", "MR01", "--study", study_uid)) == 1
    assert len(listed("--since", "1h")) == 6 and listed("--since", "1h", "--limit", "2")[0]["id"] == 6
    assert "MR01" in gw.cli("spool", "list", "--calling-ae", "MR01").stdout


def test_study_report_shows_refusals_and_retry_takes_one_study(tmp_path: Path, gateway) -> None:
    """Instances the archive never took are shown with the reason, the archive's
    failure is the exit status, and a retry by study requeues that study only."""
    gw, mine, theirs = dead_studies(tmp_path, gateway, 2)
    study_uid = uids(mine[0])[0]

    result = gw.cli("study", study_uid)
    assert result.returncode == 1  # the archive could not be asked
    assert "2 dead: gave up after 1 attempts" in result.stdout
    assert "archive (dicomweb): could not be asked" in result.stdout
    data = json.loads(gw.cli("study", study_uid, "--json").stdout)
    (row,) = data["series"]
    assert row["states"]["dead"] == 2 and row["archive_instances"] is None
    (error,) = row["errors"]
    assert error["state"] == "dead" and error["instances"] == 2 and error["error"].startswith("gave up after 1 attempts")
    offline = gw.cli("study", study_uid, "--no-archive", "--json")
    assert offline.returncode == 0 and json.loads(offline.stdout)["archive"] is None

    assert gw.cli("spool", "retry", "--study", study_uid, "--dead").returncode == 2
    retried = gw.cli("spool", "retry", "--study", study_uid)
    assert "requeued 2" in retried.stdout
    other_study = json.loads(gw.cli("spool", "list", "--study", uids(theirs[0])[0], "--json").stdout)
    assert [r["state"] for r in other_study] == ["dead"]  # not requeued
    gw.wait_counts(dead=3, timeout=30)  # still no archive: dead again, never lost


@pytest.mark.slow
def test_study_report_compares_with_orthanc(tmp_path: Path, orthanc, gateway) -> None:
    """The archive's own count beside the spool's: an instance removed from the archive
    after delivery, and a series the archive got from elsewhere, both show."""
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    study_uid = "1.2.826.0.1.3680043.8.498.4343"
    sent = ct_series(tmp_path / "a", 3, 32, 32, study_uid=study_uid)
    direct = ct_series(tmp_path / "b", 2, 32, 32, study_uid=study_uid)
    store(gw, sent, "CT01")
    gw.wait_counts(delivered=3, timeout=60)
    orthanc.upload(direct)
    orthanc.delete_instance(uids(sent[0])[2])

    data = json.loads(gw.cli("study", study_uid, "--json").stdout)
    rows = {row["series_uid"]: row for row in data["series"]}
    mine, elsewhere = rows[uids(sent[0])[1]], rows[uids(direct[0])[1]]
    assert mine["states"]["delivered"] == 3 and mine["archive_instances"] == 2
    assert elsewhere["instances"] == 0 and elsewhere["states"] is None and elsewhere["archive_instances"] == 2
    assert data["archive"] == {"error": None, "series": 2, "instances": 4}
    text = gw.cli("study", study_uid).stdout
    assert "not in the spool (never received here, or purged after delivery)" in text
    assert "archive (dicomweb): 4 instances in 2 series" in text


def test_a_study_sent_by_mistake_is_withdrawn_before_it_reaches_the_archive(tmp_path: Path, gateway) -> None:
    """A study stored under the wrong patient while the archive is down: `spool discard`
    says what it would take, then takes the study's undelivered instances (files and
    rows), leaves the other study alone, and a restart does not bring them back."""
    gw, wrong, right = dead_studies(tmp_path, gateway, 3)
    study_uid = uids(wrong[0])[0]
    files = {r["file"] for r in json.loads(gw.cli("spool", "list", "--study", study_uid, "--json").stdout)}
    assert len(files) == 3 and all((gw.spool_dir / f).exists() for f in files)

    dry = gw.cli("spool", "discard", "--study", study_uid)
    assert dry.returncode == 0 and "would discard 3 undelivered instance(s)" in dry.stdout and "add --yes" in dry.stdout
    assert len(json.loads(gw.cli("spool", "list", "--study", study_uid, "--json").stdout)) == 3

    done = gw.cli("spool", "discard", "--study", study_uid, "--yes")
    assert done.returncode == 0, done.stderr
    assert f"discarded 3 undelivered instance(s) of study {study_uid} (queued 0, failed 0, dead 3)" in done.stdout
    assert json.loads(gw.cli("spool", "list", "--study", study_uid, "--json").stdout) == []
    assert not any((gw.spool_dir / f).exists() for f in files)
    assert [r["study_uid"] for r in json.loads(gw.cli("spool", "list", "--json").stdout)] == [uids(right[0])[0]]
    report = gw.cli("study", study_uid, "--no-archive")
    assert "discarded by an administrator (spool discard) at" in report.stdout, report.stdout
    assert json.loads(gw.cli("study", study_uid, "--json", "--no-archive").stdout)["discarded_at"] > 0
    assert json.loads(gw.cli("study", uids(right[0])[0], "--json", "--no-archive").stdout)["discarded_at"] is None

    gw.stop()
    gw.start()  # start-up adopts records without rows: none of the discarded is left to adopt
    assert gw.counts()["dead"] == 1 and sum(gw.counts().values()) == 1
    assert "discarded by an administrator" not in gw.cli("spool", "list").stdout


def test_a_discard_right_after_the_c_stores_takes_what_was_not_indexed_yet(tmp_path: Path, gateway) -> None:
    """The study is discarded just after storescu's C-STOREs were answered, while their
    spool rows still wait (another process held the spool database's write lock as they
    arrived, so the indexer backs off): `spool discard` finds no row, yet the two
    instances never reach the archive and their files go; the same study stored again
    after the discard is delivered."""
    audit_file = tmp_path / "audit.log"
    gw = gateway(spool={"busy_timeout": 0.05}, extra=f'\n[audit]\nfile = "{audit_file}"\n')
    first, again = ct_series(tmp_path / "ct", 2, 32, 32), ct_series(tmp_path / "again", 1, 32, 32)
    study_uid = uids(first[0])[0]
    for path in again:  # the corrected study: same Study Instance UID
        ds = dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(path)
    # The CLI waits for the lock (the daemon's rows do not: they back off, then retry).
    waiting_cli = tmp_path / "cli.toml"
    waiting_cli.write_text(gw.config_path.read_text().replace("busy_timeout = 0.05", "busy_timeout = 30"))
    lock = sqlite3.connect(gw.spool_dir / "spool.sqlite", timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        assert dcmtk.storescu(gw.port, first, gw.ae_title).returncode == 0
        wait_until(lambda: "cannot index spooled instances" in gw.log(), 10, 0.05, "the rows were written")
        discard = subprocess.Popen(
            [sys.executable, "-m", "gateway", "spool", "discard", "--study", study_uid, "--yes", "--config", str(waiting_cli)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(3.0)  # the CLI is up and waiting; the indexer's pause has grown past a second
    finally:
        lock.rollback()
        lock.close()
    out, err = discard.communicate(timeout=60)
    assert discard.returncode == 0 and "discarded 0 undelivered instance(s)" in out, out + err
    wait_until(lambda: "withdrew 2 instance(s) acknowledged before their study was discarded" in gw.log(), 20, 0.1)

    def withdrawal_audited() -> bool:  # the CLI audited its part (none); the daemon the rest
        return any(
            event_of(m) == ("110105", "D")
            and m.find("ParticipantObjectIdentification").get("ParticipantObjectID") == study_uid  # type: ignore[union-attr]
            and "2 instance(s) acknowledged before it withdrawn" in (m.findtext("EventIdentification/EventOutcomeDescription") or "")
            for m in file_messages(audit_file)
        )

    wait_until(withdrawal_audited, 10, 0.1, "the withdrawal was not audited")
    assert dcmtk.storescu(gw.port, again, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1, timeout=30)
    assert sum(gw.counts().values()) == 1
    withdrawn = [uids(p)[2].encode() for p in first]
    assert not [f for f in (gw.spool_dir / "objects").glob("*/*.dcm") if any(u in f.read_bytes() for u in withdrawn)]
    assert [r["sop_instance_uid"] for r in json.loads(gw.cli("spool", "list", "--json").stdout)] == [uids(again[0])[2]]
