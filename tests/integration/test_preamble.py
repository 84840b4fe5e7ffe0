"""The spool's record preamble never leaves the gateway.

A received instance waits in the spool as a Part 10 file whose 128-byte preamble is
the spool's own: its length, checksum, and who sent it (the modality's AE title, or a
STOW-RS client's address). What leaves (a STOW-RS to the archive, the facade's WADO-RS
and WADO-URI answers) carries the zero preamble PS3.10 7.1 asks of an unused one, with
every byte after it as received. Checked on the bytes Orthanc stored and on the bytes
curl got from the facade, over both upstreams.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from gateway.part10 import read_file_meta
from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.fixtures import gateway_over
from tests.support.orthanc import Orthanc, build_multipart_related, parse_multipart_related
from tests.support.synth import ct_series

ZERO_PREAMBLE = bytes(128)


@pytest.fixture(params=["local", "orthanc"])
def facade(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Gateway, Orthanc | None]]:
    with gateway_over(request.param, tmp_path) as pair:
        yield pair


def assert_as_sent_behind_zeros(got: bytes, sent: Path, where: str, whole: bool) -> None:
    """Zeros, then the data set as sent; ``whole``: the File Meta as sent too (a
    C-STORE carries none: the gateway writes it)."""
    original = sent.read_bytes()
    assert got[:128] == ZERO_PREAMBLE, f"{where}: preamble {got[:16]!r}..."
    if whole:
        assert got[128:] == original[128:], f"{where}: not the bytes sent"
    else:
        assert got[read_file_meta(got).dataset_offset :] == original[read_file_meta(original).dataset_offset :], where


def test_what_leaves_has_a_zero_preamble_and_the_bytes_as_received(
    tmp_path: Path, facade: tuple[Gateway, Orthanc | None]
) -> None:
    gw, orthanc = facade
    stored, posted = ct_series(tmp_path / "series", 2, 32, 32)
    # one by C-STORE, one by STOW-RS (whose preamble, a client's own, is replaced too)
    result = dcmtk.storescu(gw.port, [stored], gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    content_type, body = build_multipart_related([b"CLIENT-PREAMBLE".ljust(128, b"!") + posted.read_bytes()[128:]])
    upload = tmp_path / "stow.body"
    upload.write_bytes(body)
    answer = curl("-X", "POST", "-H", f"Content-Type: {content_type}", "--data-binary", f"@{upload}", f"{gw.web_url}/dicom-web/studies")
    assert answer.status == 200, answer.body
    gw.wait_counts(timeout=60, delivered=2)

    for path in (stored, posted):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study, series, sop = ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
        if orthanc is not None:
            assert_as_sent_behind_zeros(orthanc.get_instance_bytes(sop), path, "the archive's copy", path is posted)
        single = curl("-H", "Accept: application/dicom", f"{gw.web_url}/dicom-web/studies/{study}/series/{series}/instances/{sop}")
        assert single.status == 200
        assert_as_sent_behind_zeros(single.body, path, "WADO-RS instance", path is posted)
        whole = curl(f"{gw.web_url}/dicom-web/studies/{study}")
        parts = parse_multipart_related(whole.content_type, whole.body)
        assert len(parts) == 2
        assert_as_sent_behind_zeros(next(p for _, p in parts if sop.encode() in p), path, "WADO-RS study", path is posted)
        uri = curl(f"{gw.web_url}/wado?requestType=WADO&studyUID={study}&seriesUID={series}&objectUID={sop}&contentType=application/dicom")
        assert uri.status == 200
        assert_as_sent_behind_zeros(uri.body, path, "WADO-URI", path is posted)
