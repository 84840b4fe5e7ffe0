"""The security cases of the fault suite, against one locked-down daemon: each hostile
request is refused and the refusal is logged in words (which AE, from where, why), and
nothing a peer sends can forge a log line or write outside the spool."""

from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support.faultsummary import FaultSummary
from tests.reliability.test_bad_input import _instance
from tests.reliability.test_fault_fuzz import associate_rq
from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.audit_messages import event_of, file_messages
from tests.support.ports import wait_until
from tests.support.pyscu import send_files

TOKEN = "fault-suite-token"
PEERS = (
    '\n[[dimse.peers]]\nae_title = "KNOWNMOD"\nhost = "127.0.0.1"\nport = 104\n'
    '\n[[dimse.peers]]\nae_title = "FARAWAY"\nhost = "127.0.0.2"\nport = 104\n'
)


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    # Nested deeper than any traversal below climbs (at most six levels), so that every
    # place one could land lies inside this fixture's own directory, which the test
    # scans (the run's whole base directory, once scanned, was 20 s of walking).
    gw = Gateway(
        tmp_path_factory.mktemp("locked") / "a" / "b" / "c" / "d" / "gw",
        dimse={"require_known_peers": True},
        http_auth={"bearer_tokens": [TOKEN]},
        extra=PEERS,
    ).start()
    try:
        yield gw
    finally:
        gw.kill()


def rejection_lines(gw: Gateway, calling_ae: str) -> list[str]:
    return [line for line in gw.log().splitlines() if f"association from {calling_ae}@" in line and "rejected:" in line]


def test_unknown_ae_is_rejected_in_words(locked: Gateway, fault_summary: FaultSummary) -> None:
    assert dcmtk.echoscu(locked.port, locked.ae_title, calling_ae="KNOWNMOD").returncode == 0
    result = dcmtk.echoscu(locked.port, locked.ae_title, calling_ae="STRANGER")
    assert result.returncode != 0
    (line,) = rejection_lines(locked, "STRANGER")
    assert "STRANGER@127.0.0.1:" in line and "calling AE title not in dimse.peers" in line
    fault_summary.reject("unknown calling AE")


def test_known_ae_from_the_wrong_host_is_rejected_in_words(locked: Gateway, fault_summary: FaultSummary) -> None:
    result = dcmtk.echoscu(locked.port, locked.ae_title, calling_ae="FARAWAY")
    assert result.returncode != 0
    (line,) = rejection_lines(locked, "FARAWAY")
    assert "FARAWAY@127.0.0.1:" in line and "from another host than 127.0.0.2" in line
    fault_summary.reject("known AE, wrong host")


def _with_sop_instance_uid(path: Path, uid: str) -> Path:
    """The file with ``uid`` as its SOP Instance UID in the data set and the file meta
    (so the C-STORE-RQ announces it too)."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(path)
    return path


def test_hostile_uids_are_refused_and_nothing_escapes_the_spool(
    locked: Gateway, tmp_path: Path, fault_summary: FaultSummary
) -> None:
    hostile = {
        "study traversal": _instance(tmp_path, "a.dcm", StudyInstanceUID="../../../../../../tmp/escaped-study"),
        "series traversal": _instance(tmp_path, "b.dcm", SeriesInstanceUID="1.2/../../../escaped-series"),
        "over-long study UID": _instance(tmp_path, "c.dcm", StudyInstanceUID="1." + "2" * 200),
        "over-long series UID": _instance(tmp_path, "d.dcm", SeriesInstanceUID="1.2." + "3" * 64),
        "newline in a UID": _instance(tmp_path, "e.dcm", StudyInstanceUID="1.2\nFORGED UID LINE"),
        "SOP instance traversal": _with_sop_instance_uid(_instance(tmp_path, "f.dcm"), "../../../../tmp/escaped-sop"),
    }
    outside = locked.workdir.parents[4]
    before = {p for p in outside.rglob("*") if p.is_file()}
    statuses = send_files(locked.port, list(hostile.values()), locked.ae_title, calling_ae="KNOWNMOD")
    assert statuses == [0xA900] * len(hostile), dict(zip(hostile, map(hex, statuses)))
    for kind in hostile:
        fault_summary.reject(kind)
    refusals = [line for line in locked.log().splitlines() if "instance from KNOWNMOD" in line and "rejected:" in line]
    assert len(refusals) == len(hostile), refusals
    assert all("is not a valid UID" in line for line in refusals), refusals
    assert not re.search(r"^FORGED", locked.log(), re.MULTILINE)
    after = {p for p in outside.rglob("*") if p.is_file()}
    assert not list(Path("/tmp").glob("escaped-*"))
    new = {p for p in after - before if locked.spool_dir not in p.parents}
    assert new <= {locked.log_path}, new
    assert sum(locked.counts().values()) == 0


def test_newline_in_calling_ae_cannot_forge_a_log_line(locked: Gateway, fault_summary: FaultSummary) -> None:
    with socket.create_connection(("127.0.0.1", locked.port), timeout=10) as sock:
        sock.sendall(associate_rq(calling=b"EV\nFORGED LINE", called=locked.ae_title.encode()))
        reply = sock.recv(64)
    assert reply[:1] == b"\x03"  # A-ASSOCIATE-RJ
    log = locked.log()
    assert not re.search(r"^FORGED", log, re.MULTILINE)
    (line,) = rejection_lines(locked, r"EV\nFORGED LINE")
    assert "calling AE title not in dimse.peers" in line
    fault_summary.reject("forged-newline AE title")


def test_facade_without_a_token_gets_401(locked: Gateway, tmp_path: Path, fault_summary: FaultSummary) -> None:
    base = f"{locked.web_url}/dicom-web"
    body = _instance(tmp_path, "stow.dcm").read_bytes()
    for request in (
        urllib.request.Request(f"{base}/studies"),
        urllib.request.Request(f"{base}/studies", data=body, headers={"Content-Type": "application/dicom"}),
        urllib.request.Request(f"{base}/studies", headers={"Authorization": "Bearer not-the-token"}),
    ):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
        assert refused.value.headers["WWW-Authenticate"]
        fault_summary.reject("facade without valid token")
    with urllib.request.urlopen(
        urllib.request.Request(f"{base}/studies", headers={"Authorization": f"Bearer {TOKEN}"}), timeout=10
    ) as resp:
        assert resp.status in (200, 204)
    assert locked.log().count("401, no valid credentials") >= 3
    assert sum(locked.counts().values()) == 0


def test_a_client_without_credentials_in_a_loop_gets_ten_log_lines_and_every_audit_event(tmp_path: Path) -> None:
    """A viewer left without its token asks hundreds of frames a second, each a 401
    (requests without credentials are not locked out). The audit trail records every
    refusal; the log says the first ten of a minute. Before, each was a WARNING: 60
    requests, 60 lines."""
    audit = tmp_path / "audit.log"
    gw = Gateway(tmp_path / "gw", http_auth={"bearer_tokens": [TOKEN]}, extra=f'\n[audit]\nfile = "{audit}"\n').start()
    try:
        for _ in range(60):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{gw.web_url}/dicom-web/studies", timeout=10)
            assert refused.value.code == 401
        assert gw.log().count("401, no valid credentials") == 10
        wait_until(lambda: len(refusals(audit)) == 60, 10, 0.2, "audit events missing")
    finally:
        gw.kill()


def refusals(audit: Path) -> list[object]:
    """The trail's User Authentication failures (110114, minor failure)."""
    return [m for m in file_messages(audit) if event_of(m)[0] == "110114"]


def test_every_answer_forbids_content_sniffing_and_names_no_versions(locked: Gateway) -> None:
    """An error text quotes the query key it refuses; with ``nosniff`` no browser takes
    such a text, or anything else the facade answers, for a page. The ``Server`` header
    names no Python or aiohttp version for a scanner to match."""
    base = f"{locked.web_url}/dicom-web"
    bearer = ("-H", f"Authorization: Bearer {TOKEN}")
    for args in (
        (*bearer, f"{base}/studies"),
        (*bearer, f"{base}/studies?%3Cscript%3Ealert(1)%3C/script%3E=1"),
        (*bearer, f"{base}/studies/1.2.3/series/1.2.4/metadata"),
        (*bearer, f"{base}/nothing-here"),
        (f"{base}/studies",),  # 401
        (f"{locked.web_url}/healthz",),
    ):
        answer = curl(*args)
        assert answer.headers.get("x-content-type-options") == "nosniff", (args[-1], answer.status)
        assert answer.headers.get("server") == "dicom-gateway", (args[-1], answer.headers.get("server"))
