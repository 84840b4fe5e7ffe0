"""The embedded archive's index damaged, and rebuilt from its files: the real daemon
refuses to start on it and names the command; `dicom-gateway archive reindex` (only
with the daemon stopped) indexes every file again, and the daemon then finds,
matches and serves every instance as before."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

from pydicom import dcmread

from tests.support import dcmtk
from tests.support.compare import assert_same_dataset
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.synth import ct_series


def test_a_damaged_index_is_rebuilt_from_the_archived_files(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw").start()
    paths = ct_series(tmp_path / "ct", 5, rows=64, columns=64)
    marked = dcmread(paths[1])
    marked.PatientBirthDate = "MRKBIRTH9"  # not a date: pydicom warns, quoting it, on reading
    marked.save_as(paths[1])
    first = dcmread(paths[0])
    try:
        assert dcmtk.storescu(gw.port, paths, gw.ae_title).returncode == 0
        gw.wait_counts(delivered=5, timeout=30)
        running = gw.cli("archive", "reindex")
        assert running.returncode == 1 and "stop the daemon first" in running.stderr, running.stderr
    finally:
        assert gw.stop() == 0
    archive = gw.spool_dir / "archive"
    with open(archive / "index.sqlite", "r+b") as fh:
        fh.write(b"not a database, not at all")
    # An older copy of one instance beside the file indexed for it, and a file that is no DICOM.
    stored = sorted((archive / "objects").glob("*/*.dcm"))
    older = stored[0].with_name("0" * 32 + ".dcm")
    shutil.copy(stored[0], older)
    os.utime(older, (time.time() - 3600, time.time() - 3600))
    (archive / "objects" / "ab" / ("f" * 32 + ".dcm")).write_bytes(b"no DICOM here")

    run = gw.cli("run")
    assert run.returncode == 1
    assert "cannot start: the embedded archive's index" in run.stderr and "cannot be read (file is not a database)" in run.stderr
    assert "`dicom-gateway archive reindex --config <this config>`" in run.stderr and "Traceback" not in run.stderr

    if os.geteuid() == 0:  # as an admin's sudo, on an archive the service's user owns
        os.chown(archive, 65534, 65534)
    rebuilt = gw.cli("archive", "reindex")
    assert rebuilt.returncode == 1, rebuilt.stdout + rebuilt.stderr  # one file could not be indexed
    assert "indexed: 5 instance(s)" in rebuilt.stdout
    assert "MRKBIRTH9" not in rebuilt.stdout + rebuilt.stderr  # no patient data on the admin's terminal
    assert f"not indexed (unreadable, left in place): objects/ab/{'f' * 32}.dcm: InvalidDicomError" in rebuilt.stdout
    assert f"not indexed (an older copy of an instance indexed from a newer file, left in place): {older.relative_to(archive)}" in rebuilt.stdout
    assert "set aside: " in rebuilt.stdout and len(list(archive.glob("index.sqlite.before-reindex-*"))) == 1
    index = (archive / "index.sqlite").stat()
    assert (index.st_uid, index.st_gid) == (archive.stat().st_uid, archive.stat().st_gid)
    with sqlite3.connect(archive / "index.sqlite") as db:  # each instance's metadata kept again
        assert db.execute("SELECT count(*) FROM metadata_texts").fetchone() == (5,)
    db.close()

    gw.start()
    try:
        found = curl(f"{gw.web_url}/dicom-web/studies/{first.StudyInstanceUID}/instances", "-H", "Accept: application/dicom+json")
        assert found.status == 200
        assert {o["00080018"]["Value"][0] for o in json.loads(found.body)} == {str(dcmread(p).SOPInstanceUID) for p in paths}
        by_patient = dcmtk.findscu(
            gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "PatientID": str(first.PatientID), "StudyInstanceUID": ""},
            extra_args=["-v"],
        )
        assert (by_patient.stdout + by_patient.stderr).count("(Pending)") == 1
        one = curl(
            f"{gw.web_url}/dicom-web/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}/instances/{first.SOPInstanceUID}",
            "-H", "Accept: application/dicom",
        )
        assert one.status == 200
        (tmp_path / "retrieved.dcm").write_bytes(one.body)
        assert_same_dataset(paths[0], tmp_path / "retrieved.dcm")
    finally:
        gw.kill()


def test_a_lost_index_is_reported_at_start_and_rebuilt(tmp_path: Path) -> None:
    """The index deleted (not damaged): the daemon starts on a new, empty one, which
    would hide every archived instance without a word; it says so at start and names
    the command, which then indexes them all again."""
    gw = Gateway(tmp_path / "gw").start()
    paths = ct_series(tmp_path / "ct", 3, rows=64, columns=64)
    study = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
    assert dcmtk.storescu(gw.port, paths, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=3, timeout=30)
    assert gw.stop() == 0
    assert "is empty, but files are stored under" not in gw.log()  # a new archive: nothing to say
    for path in (gw.spool_dir / "archive").glob("index.sqlite*"):
        path.unlink()
    gw.start()
    try:
        assert "the embedded archive's index" in gw.log() and "is empty, but files are stored under" in gw.log()
        assert "`dicom-gateway archive reindex`" in gw.log()
    finally:
        assert gw.stop() == 0
    rebuilt = gw.cli("archive", "reindex")
    assert rebuilt.returncode == 0 and "indexed: 3 instance(s)" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
    gw.start()
    try:
        found = curl(f"{gw.web_url}/dicom-web/studies/{study}/instances", "-H", "Accept: application/dicom+json")
        assert found.status == 200 and len(json.loads(found.body)) == 3
        assert gw.log().count("is empty, but files are stored under") == 1  # not at the third start
    finally:
        gw.kill()
