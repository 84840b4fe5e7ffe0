"""Storage Commitment Push Model: pynetdicom as the modality (dcmtk has no storage
commitment SCU), the real daemon as the SCP. The report comes on the modality's own
association when it waits for it, and on a new association to its configured address
when it released at once (Orthanc) or refused it there; the decision follows what the
spool and archive hold."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, Association, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, StorageCommitmentPushModel

from tests.support import dcmtk
from tests.support.ports import closed_port, free_port, wait_until
from tests.support.synth import ct_series

WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def request(refs: list[tuple[str, str]]) -> tuple[str, Dataset]:
    ds = Dataset()
    ds.TransactionUID = generate_uid()
    ds.ReferencedSOPSequence = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        ds.ReferencedSOPSequence.append(item)
    return str(ds.TransactionUID), ds


class Reports:
    """N-EVENT-REPORTs a modality received, from any association."""

    def __init__(self) -> None:
        self.got: list[tuple[int, Dataset, str]] = []
        self.lock = threading.Lock()

    def handler(self, event) -> tuple[int, None]:  # type: ignore[no-untyped-def]
        with self.lock:
            self.got.append((event.event_type, event.event_information, event.assoc.requestor.ae_title))
        return 0x0000, None

    def wait(self, timeout: float = 20.0) -> tuple[int, Dataset, str]:
        wait_until(lambda: bool(self.got), timeout, 0.05, "no N-EVENT-REPORT")
        return self.got[0]


@contextlib.contextmanager
def asking(gw, ds: Dataset) -> Iterator[tuple[Association, Reports]]:  # type: ignore[no-untyped-def]
    """As a modality that waits on its own association: one N-ACTION (answered
    Success), then the association (still open, for more requests) and the reports
    it got, the first N-EVENT-REPORT among them."""
    reports = Reports()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
        assert status.Status == 0x0000
        reports.wait()
        yield assoc, reports
    finally:
        assoc.release()


def ask(gw, ds: Dataset) -> tuple[int, Dataset]:  # type: ignore[no-untyped-def]
    """`asking`, the association released at once: the report's event type and data set."""
    with asking(gw, ds) as (_, reports):
        event_type, report, _ = reports.got[0]
        return event_type, report


def uids(paths: list[Path]) -> list[tuple[str, str]]:
    return [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in (dcmread(p, stop_before_pixels=True) for p in paths)]


def test_commitment_reported_on_the_same_association(tmp_path: Path, gateway) -> None:
    """Committed: instances in the spool, and instances only the archive still holds
    (their spool rows purged after delivery); failed: one known nowhere (0x0112), one
    asked under another SOP class (0x0119). A malformed N-ACTION gets a status."""
    gw = gateway()
    archived = ct_series(tmp_path / "archived", 2, 32, 32)
    assert dcmtk.storescu(gw.port, archived, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=2)
    assert "purged 2" in gw.cli("spool", "purge", "--delivered").stdout
    spooled = ct_series(tmp_path / "spooled", 2, 32, 32)
    assert dcmtk.storescu(gw.port, spooled, gw.ae_title).returncode == 0
    unknown = (CTImageStorage, generate_uid())
    (first, second) = uids(spooled)
    conflict = (MRImageStorage, second[1])
    transaction, ds = request([*uids(archived), first, unknown, conflict])

    with asking(gw, ds) as (assoc, reports):
        event_type, report, _ = reports.got[0]
        bad, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, generate_uid())
        assert bad.Status == 0x0117
        no_action, _ = assoc.send_n_action(ds, 2, StorageCommitmentPushModel, WELL_KNOWN)
        assert no_action.Status == 0x0123
    assert event_type == 2
    assert str(report.TransactionUID) == transaction
    assert report.RetrieveAETitle == gw.ae_title
    committed = {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence}
    assert committed == {u for _, u in uids(archived)} | {first[1]}
    failed = {(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in report.FailedSOPSequence}
    assert failed == {(unknown[1], 0x0112), (second[1], 0x0119)}
    wait_until(lambda: f"storage commitment {transaction} reported to MODALITY" in gw.log(), 10, 0.1)
    assert len(reports.got) == 1
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10).read().decode()
    assert 'gateway_storage_commitment_instances_total{result="committed"} 3.0' in metrics
    assert 'gateway_storage_commitment_instances_total{result="failed"} 2.0' in metrics
    assert 'gateway_storage_commitment_reports_total{via="same_association"} 1.0' in metrics


def refusing(gw, ds: Dataset) -> Association:  # type: ignore[no-untyped-def]
    """As a modality that takes reports only where it listens: one N-ACTION (answered
    Success) on an association that stays open and answers an N-EVENT-REPORT on it
    with 0x0110. (A modality that releases at once, as Orthanc's does, is the other
    way to need a new association, but with pynetdicom it races the gateway's report.)"""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate(
        "127.0.0.1", gw.port, ae_title=gw.ae_title, evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: (0x0110, None))]
    )
    assert assoc.is_established
    status, _ = assoc.send_n_action(ds, 1, StorageCommitmentPushModel, WELL_KNOWN)
    assert status.Status == 0x0000
    return assoc


def test_commitment_reported_on_a_new_association_when_refused_on_its_own(tmp_path: Path, gateway) -> None:
    """A modality that answers the report on its own association with a failure gets
    it on an association the gateway opens to its configured address, taking the SCP
    role by role selection. Instances the archive refused (dead) are not committed
    (0x0110), nor one the spool lacks while the archive cannot be asked."""
    reports = Reports()
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = free_port()
    server = listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    try:
        peer = f'\n[[dimse.peers]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n'
        gw = gateway(upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web", spool={"max_attempts": 1}, extra=peer)
        stored = ct_series(tmp_path / "ct", 2, 32, 32)
        assert dcmtk.storescu(gw.port, stored, gw.ae_title, calling_ae="MODALITY").returncode == 0
        gw.wait_counts(dead=2, timeout=30)  # the archive is unreachable: both dead
        unknown = (CTImageStorage, generate_uid())
        transaction, ds = request([*uids(stored), unknown])

        assoc = refusing(gw, ds)
        event_type, report, caller = reports.wait()
        assoc.release()
        assert caller == gw.ae_title
        assert event_type == 2 and str(report.TransactionUID) == transaction
        assert {(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in report.FailedSOPSequence} == {
            (u, 0x0110) for _, u in [*uids(stored), unknown]
        }
        assert "ReferencedSOPSequence" not in report
        wait_until(lambda: "reported to MODALITY on a new association (0x0000)" in gw.log(), 10, 0.1)
        assert "answered the report on its association with 0x0110; calling it back on a new one" in gw.log()
    finally:
        server.shutdown()


def test_a_report_refused_on_both_associations_is_given_up_with_a_warning(tmp_path: Path, gateway) -> None:
    """A modality that answers the report with a failure where it listens as well as on
    its own association: one WARNING says it was refused and not sent again, and the
    report counts as undelivered (before: logged at INFO as reported)."""
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = free_port()
    server = listener.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda event: (0x0110, None))]
    )
    try:
        peer = f'\n[[dimse.peers]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n'
        gw = gateway(extra=peer)
        stored = ct_series(tmp_path / "ct", 1, 32, 32)
        assert dcmtk.storescu(gw.port, stored, gw.ae_title).returncode == 0
        transaction, ds = request(uids(stored))
        assoc = refusing(gw, ds)
        wait_until(lambda: "refused the report on a new association too (0x0110)" in gw.log(), 20, 0.1, "not logged")
        assoc.release()
        assert f"storage commitment {transaction}: MODALITY refused the report" in gw.log()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10).read().decode()
        assert 'gateway_storage_commitment_reports_total{via="undelivered"} 1.0' in metrics
        assert json.loads(gw.cli("spool", "status", "--json").stdout)["commitments_owed"] == 0
    finally:
        server.shutdown()


def test_instances_acknowledged_before_their_rows_are_written_are_committed(tmp_path: Path, gateway) -> None:
    """A modality asks for commitment right after its C-STOREs were answered, while the
    spool rows of those instances still wait to be written (here another process held
    the spool database's write lock while they arrived, and the indexer backs off).
    Their records are sealed, so they are committed, not "no such object instance"
    (CI once saw Orthanc told that, when the rows came a few milliseconds late)."""
    gw = gateway(spool={"busy_timeout": 0.05})
    stored = ct_series(tmp_path / "ct", 2, 32, 32)
    lock = sqlite3.connect(gw.spool_dir / "spool.sqlite", timeout=10, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        assert dcmtk.storescu(gw.port, stored, gw.ae_title).returncode == 0
        wait_until(lambda: "cannot index spooled instances" in gw.log(), 10, 0.05, "the rows were written")
        time.sleep(2.0)  # the indexer's pause grows past a second
    finally:
        lock.rollback()
        lock.close()
    event_type, report = ask(gw, request(uids(stored))[1])
    assert event_type == 1 and "FailedSOPSequence" not in report, gw.log()
    assert {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence} == {u for _, u in uids(stored)}
    gw.wait_counts(delivered=2, timeout=30)  # and the rows were written after all


def test_with_ack_delivered_commitment_waits_for_the_archive(tmp_path: Path, orthanc, gateway) -> None:
    """ack = "delivered": committed once the archive (Orthanc) holds them, as a C-STORE
    Success would say; the report waits for delivery rather than committing early."""
    gw = gateway(upstream_url=orthanc.dicomweb_url, dimse={"ack": "delivered", "ack_timeout": 20})
    stored = ct_series(tmp_path / "ct", 3, 32, 32)
    assert dcmtk.storescu(gw.port, stored, gw.ae_title).returncode == 0
    transaction, ds = request(uids(stored))
    event_type, report = ask(gw, ds)
    assert event_type == 1 and "FailedSOPSequence" not in report
    assert {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence} == {u for _, u in uids(stored)}
    assert {u for _, u in uids(stored)} <= orthanc.sop_instance_uids()


def test_orthanc_as_the_modality_gets_its_commitment_report(tmp_path: Path, orthanc, gateway) -> None:
    """Orthanc's own Storage Commitment SCU (REST /modalities/{id}/storage-commitment)
    asks the gateway about instances it sent; Orthanc releases after the N-ACTION, so
    the report reaches it on the association the gateway opens back to its DICOM port."""
    peer = f'\n[[dimse.peers]]\nae_title = "{orthanc.aet}"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'
    gw = gateway(extra=peer)
    orthanc.set_modality("gw", gw.ae_title, "127.0.0.1", gw.port)
    stored = ct_series(tmp_path / "ct", 2, 32, 32)
    assert dcmtk.storescu(gw.port, stored, gw.ae_title).returncode == 0
    unknown = (CTImageStorage, generate_uid())
    job = orthanc.post_json(
        "/modalities/gw/storage-commitment", {"DicomInstances": [list(p) for p in [*uids(stored), unknown]], "Timeout": 30}
    )
    report_id = job["ID"]

    def done() -> dict | None:
        report = orthanc.get_json(f"/storage-commitment/{report_id}")
        return report if report["Status"] != "Pending" else None

    report = wait_until(done, 30, 0.2, "Orthanc's storage commitment stayed pending")
    assert report["Status"] == "Failure", gw.log()  # one of the three is known nowhere
    assert {i["SOPInstanceUID"] for i in report["Success"]} == {u for _, u in uids(stored)}, (report, gw.log())
    assert [(i["SOPInstanceUID"], i["FailureReason"]) for i in report["Failures"]] == [(unknown[1], 0x0112)], gw.log()


def test_a_commitment_interrupted_by_a_crash_is_reported_after_the_restart(tmp_path: Path, gateway) -> None:
    """Accepted (N-ACTION-RSP Success) but not yet reported when the daemon is killed
    -9: the request was recorded before the answer, so the restarted daemon reports it
    on a new association."""
    port = free_port()
    peer = f'\n[[dimse.peers]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = {port}\n'
    gw = gateway(extra=peer)
    stored = ct_series(tmp_path / "ct", 2, 32, 32)
    assert dcmtk.storescu(gw.port, stored, gw.ae_title, calling_ae="MODALITY").returncode == 0
    transaction, ds = request(uids(stored))
    assoc = refusing(gw, ds)
    # Nobody listens at the modality's address yet: the first call back fails, and the
    # daemon dies before its next try.
    wait_until(lambda: f"storage commitment {transaction}: report to MODALITY, try 1" in gw.log(), 20, 0.05)
    owed = json.loads(gw.cli("spool", "status", "--json").stdout)["commitments_owed"]
    gw.kill()
    assoc.abort()
    assert owed == 1

    reports = Reports()
    listener = AE(ae_title="MODALITY")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    server = listener.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_N_EVENT_REPORT, reports.handler)])
    try:
        gw.start()
        event_type, report, caller = reports.wait()
    finally:
        server.shutdown()
    assert caller == gw.ae_title and event_type == 1 and str(report.TransactionUID) == transaction
    assert {str(i.ReferencedSOPInstanceUID) for i in report.ReferencedSOPSequence} == {u for _, u in uids(stored)}
    assert f"storage commitment {transaction} from MODALITY: reporting after a restart" in gw.log()
    wait_until(lambda: f"storage commitment {transaction} reported to MODALITY on a new association" in gw.log(), 10, 0.1)
    gw.stop()
    gw.start()  # reported once: nothing owed any more
    wait_until(lambda: gw.log().count("listening: DIMSE") == 3, 10, 0.05, "third start not logged")
    assert gw.log().count("reporting after a restart") == 1
    assert json.loads(gw.cli("spool", "status", "--json").stdout)["commitments_owed"] == 0
