"""No patient data in the log at INFO and above, nor in the spool's last_error.

Values arrive from two sides: a modality's C-FIND identifier (a malformed key value is
refused, and the refusal must name the key, not quote the value), and an archive's
error answers (error pages and reason phrases may echo the attributes they were sent).
Each test plants a marker where a patient name would be and looks for it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support import dcmtk
from tests.support.fakeqido import FakeQido
from tests.support.ports import wait_until
from tests.support.synth import ct_series


@pytest.fixture
def fake_archive() -> Iterator[list[FakeQido]]:
    servers: list[FakeQido] = []
    yield servers
    for server in servers:
        server.stop()


def final_status(result) -> str:  # type: ignore[no-untyped-def]
    """The status name findscu -v printed for the final response."""
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "Final Find Response" in line]
    assert lines, result.stdout + result.stderr
    return lines[-1]


# (keys, final status findscu reports); every value carries its own marker.
MALFORMED = [
    ({"QueryRetrieveLevel": "STUDY", "PatientBirthDate": "MRKBIRTH1"}, "Failed: UnableToProcess"),
    ({"QueryRetrieveLevel": "STUDY", "PatientBirthDate": "19700101-MRKBIRTH2"}, "Failed: UnableToProcess"),
    ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "MRKUID1^DOE"}, "Failed: UnableToProcess"),
    ({"QueryRetrieveLevel": "STUDY", "NumberOfStudyRelatedInstances": "MRKCOUNT1"}, "Failed: UnableToProcess"),
    ({"QueryRetrieveLevel": "MRKLEVEL1"}, "Error: DataSetDoesNotMatchSOPClass"),
    # Matched leniently (no archive has such a patient), but never logged.
    ({"QueryRetrieveLevel": "STUDY", "PatientName": "MRKNAME1^a^b^c^d^e=f=g=h"}, "Success"),
    ({"QueryRetrieveLevel": "STUDY", "PatientID": "MRKID1" + "X" * 70}, "Success"),
]


def test_malformed_find_values_are_refused_without_logging_them(gateway) -> None:
    gw = gateway()
    for keys, expected in MALFORMED:
        result = dcmtk.findscu(gw.port, gw.ae_title, keys, extra_args=("-v",))
        assert expected in final_status(result), (keys, final_status(result))
    wait_until(lambda: gw.log().count("C-FIND from") >= len(MALFORMED), 10, 0.1, "C-FIND requests not logged")
    log = gw.log()
    assert "PatientBirthDate" in log and "StudyInstanceUID" in log  # the keys are named...
    for marker in ("MRKBIRTH1", "MRKBIRTH2", "MRKUID1", "MRKCOUNT1", "MRKLEVEL1", "MRKNAME1", "MRKID1"):
        assert marker not in log, (marker, log)  # ...their values are not


ECHO_BODY = b'{"error": "cannot store instance of patient MRKBODY^JANE, id MRKPID"}'
ECHO_REASON = "Bad patient MRKREASON^JOHN"


@pytest.mark.parametrize("status", [400, 503])
def test_archive_error_bodies_stay_out_of_log_and_last_error(tmp_path: Path, gateway, fake_archive, status: int) -> None:
    archive = FakeQido(status=status, body=ECHO_BODY, reason=ECHO_REASON).start()
    fake_archive.append(archive)
    gw = gateway(upstream_url=archive.url)
    files = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    result = dcmtk.storescu(gw.port, files, gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    if status == 400:
        gw.wait_counts(dead=1, timeout=30)
    else:
        wait_until(lambda: gw.log().count("will be retried") >= 2, 30, 0.2, "no retried delivery")
    (row,) = json.loads(gw.cli("spool", "list", "--json").stdout)
    assert f"HTTP {status}" in row["last_error"], row
    listing = gw.cli("spool", "list").stdout
    log = gw.log()
    for marker in ("MRKBODY", "MRKPID", "MRKREASON"):
        assert marker not in row["last_error"] and marker not in listing, (marker, row)
        assert marker not in log, (marker, log)

    findscu = dcmtk.findscu(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "PatientID": "*"}, extra_args=("-v",))
    expected = "Failed: UnableToProcess" if status == 400 else "Refused: OutOfResources"
    assert expected in final_status(findscu)
    wait_until(lambda: "C-FIND from" in gw.log(), 10, 0.1, "C-FIND not logged")
    log = gw.log()
    for marker in ("MRKBODY", "MRKPID", "MRKREASON"):
        assert marker not in log, (marker, log)


def test_invalid_values_stored_in_the_embedded_archive_are_not_logged(tmp_path: Path, gateway) -> None:
    """The archive's writer process parses every stored header with pydicom, whose
    warnings about invalid values quote them; its stderr is the daemon's log."""
    gw = gateway()
    (path,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    ds = pydicom.dcmread(path)
    ds.PatientBirthDate = "MRKBIRTH9"
    ds.PatientAge = "MRKAGE9"
    ds.save_as(path, enforce_file_format=True)
    assert dcmtk.storescu(gw.port, [path], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(ds.StudyInstanceUID), "PatientBirthDate": ""}
    (tmp_path / "found").mkdir()
    assert dcmtk.findscu(gw.port, gw.ae_title, keys, output_dir=tmp_path / "found").returncode == 0
    (answer,) = (tmp_path / "found").iterdir()
    assert pydicom.dcmread(answer).PatientBirthDate == "MRKBIRTH9"  # stored as sent, and answered
    log = gw.log()
    for marker in ("MRKBIRTH9", "MRKAGE9"):
        assert marker not in log, (marker, log)
