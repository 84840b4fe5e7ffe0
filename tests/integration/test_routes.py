"""Routes (`[[dimse.routes]]`): copies of what modalities send, sent on by C-STORE to
other DICOM nodes besides the archive. Real processes throughout: storescu as the
modalities, dcmtk storescp as the destinations (one taking any syntax, one Implicit
VR Little Endian only), the daemon over its embedded archive."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

from gateway.part10 import META_HEAD, read_file_meta
from tests.integration.test_metrics import scrape, value
from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.dcmtk import StoreSCP
from tests.support.ports import free_port, wait_until
from tests.support.synth import ct_series

IMPLICIT_LE = "1.2.840.10008.1.2"


def peer(ae: str, port: int) -> str:
    return f'\n[[dimse.peers]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n'


def route(destination: str, **match: list[str]) -> str:
    keys = "".join(f"{k} = {json.dumps(v)}\n" for k, v in match.items())
    return f'\n[[dimse.routes]]\ndestination = "{destination}"\n{keys}'


def store(gw, paths: list[Path], calling_ae: str) -> None:  # type: ignore[no-untyped-def]
    result = dcmtk.storescu(gw.port, paths, gw.ae_title, calling_ae=calling_ae)
    assert result.returncode == 0, result.stdout + result.stderr


def dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set, as it went over the wire (after the File Meta)."""
    data = path.read_bytes()
    return data[read_file_meta(data[:META_HEAD]).dataset_offset :]


def received(scp: StoreSCP) -> dict[str, Path]:
    """SOP Instance UID -> file, of what a storescp wrote."""
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.output_dir.iterdir() if p.is_file()}


def test_routes_copy_what_they_match_as_stored_or_converted(tmp_path: Path, gateway) -> None:
    with StoreSCP(tmp_path / "ai", ae_title="AI") as ai, \
            StoreSCP(tmp_path / "old", ae_title="OLDPACS", implicit_only=True) as old:
        gw = gateway(extra=peer("AI", ai.port) + peer("OLDPACS", old.port)
                     + route("AI", calling_ae=["CT01"]) + route("AI", modalities=["MR"])
                     + route("OLDPACS", calling_ae=["MR01"], sop_classes=["CTImageStorage"]))
        ct01 = ct_series(tmp_path / "ct01", 3, 64, 64)
        mr01 = ct_series(tmp_path / "mr01", 2, 64, 64)
        us01 = ct_series(tmp_path / "us01", 2, 64, 64)
        labelled_mr = dcmread(us01[1])
        labelled_mr.Modality = "MR"
        labelled_mr.save_as(us01[1])
        store(gw, ct01, "CT01")
        store(gw, mr01, "MR01")
        store(gw, us01, "US01")
        gw.wait_counts(delivered=7)  # the archive has everything, routed or not
        wait_until(lambda: len(received(ai)) == 4 and len(received(old)) == 2, 30, 0.2, "copies never arrived")

        # CT01's instances reached AI exactly as the modality sent them.
        at_ai = received(ai)
        for path in ct01:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(at_ai[uid]) == dataset_bytes(path)
        # MR01's went to the old PACS converted to the one syntax it takes, pixels intact.
        at_old = received(old)
        for path in mr01:
            sent = dcmread(path)
            got = dcmread(at_old[str(sent.SOPInstanceUID)])
            assert got.file_meta.TransferSyntaxUID == IMPLICIT_LE
            assert got.PixelData == sent.PixelData and got.StudyInstanceUID == sent.StudyInstanceUID
        # US01's CT matched no route; its MR went to AI by its modality.
        us_uid, mr_uid = (str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in us01)
        assert us_uid not in at_ai and us_uid not in at_old and mr_uid in at_ai

        wait_until(lambda: gw.health()["spool"]["routes"]["OLDPACS"]["counts"]["delivered"] == 2, 10, 0.2, "not recorded")
        health = gw.health()
        assert health["status"] == "ok"
        assert health["spool"]["routes"]["AI"]["counts"] == {"queued": 0, "sending": 0, "delivered": 4, "failed": 0, "dead": 0}
        samples = scrape(gw)
        assert value(samples, "gateway_route_copies_total", destination="AI", state="delivered") == 4
        assert value(samples, "gateway_route_copies_spooled", destination="OLDPACS", state="delivered") == 2
        status = gw.cli("spool", "status")
        assert "route AI: copies 4 delivered" in status.stdout, status.stdout
        study_uid = str(dcmread(ct01[0], stop_before_pixels=True).StudyInstanceUID)
        report = gw.cli("study", study_uid)
        assert "copies to AI: 3 delivered" in report.stdout, report.stdout


def test_copies_wait_out_an_outage_and_a_kill_and_keep_their_files(tmp_path: Path, gateway) -> None:
    port = free_port()
    gw = gateway(extra=peer("AI", port) + route("AI"), spool={"retain_delivered_hours": 0})
    series = ct_series(tmp_path / "ct", 3, 64, 64)
    store(gw, series, "CT01")
    gw.wait_counts(delivered=3)
    wait_until(lambda: gw.health()["spool"]["routes"]["AI"]["counts"]["failed"] == 3, 20, 0.2, "copies not failed")
    assert value(scrape(gw), "gateway_route_oldest_pending_age_seconds", destination="AI") > 0
    health = gw.health()
    assert "cannot connect" in health["spool"]["routes"]["AI"]["last_error"]
    # Delivered to the archive, but the files stay while their copies wait.
    assert len(json.loads(gw.cli("spool", "list", "--json").stdout)) == 3
    gw.kill()

    with StoreSCP(tmp_path / "ai", ae_title="AI", port=port) as ai:
        gw.start()
        wait_until(lambda: len(received(ai)) == 3, 30, 0.2, "copies never arrived after the restart")
        for path in series:
            uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert dataset_bytes(received(ai)[uid]) == dataset_bytes(path)
        # Every copy delivered: the files go at once (retain_delivered_hours = 0).
        wait_until(lambda: json.loads(gw.cli("spool", "list", "--json").stdout) == [], 10, 0.2, "files kept")
        assert gw.health()["spool"]["routes"] == {}
        samples = scrape(gw)
        assert ("gateway_route_oldest_pending_age_seconds", frozenset({("destination", "AI")})) in samples
        assert value(samples, "gateway_route_oldest_pending_age_seconds", destination="AI") == 0
        assert value(samples, "gateway_route_copies_spooled", destination="AI") == 0


class Destination:
    """A pynetdicom Storage SCP whose answer a test sets (PS3.4 B.2.3 statuses)."""

    def __init__(self, port: int) -> None:
        self.status = 0xA900  # "data set does not match SOP class": a refusal for good
        self.stored: list[str] = []
        ae = AE(ae_title="AI")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self.handler)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def handler(self, event) -> int:  # type: ignore[no-untyped-def]
        if self.status == 0x0000:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return self.status


def test_a_refused_copy_is_dead_until_retried_and_discard_withdraws_pending_copies(tmp_path: Path, gateway) -> None:
    port = free_port()
    destination = Destination(port)
    try:
        gw = gateway(extra=peer("AI", port) + route("AI"))
        first = ct_series(tmp_path / "first", 2, 32, 32)
        store(gw, first, "CT01")
        gw.wait_counts(delivered=2)
        wait_until(lambda: gw.health()["spool"]["routes"]["AI"]["counts"]["dead"] == 2, 20, 0.2, "copies not dead")
        health = gw.health()
        assert health["status"] == "degraded"  # a dead copy is something an admin must see
        assert health["spool"]["routes"]["AI"]["last_error"] == "destination answered C-STORE status 0xA900"
        assert "route to AI: instance" in gw.log() and "not copied" in gw.log()
        owed = json.loads(gw.cli("spool", "list", "--route", "AI", "--state", "dead", "--json").stdout)
        assert sorted(r["sop_instance_uid"] for r in owed) == sorted(
            str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in first
        )
        assert {(r["destination"], r["state"], r["last_error"]) for r in owed} == {
            ("AI", "dead", "destination answered C-STORE status 0xA900")
        }
        assert all(r["calling_ae"] == "CT01" for r in owed)
        table = gw.cli("spool", "list", "--route", "AI").stdout
        assert table.count("destination answered C-STORE status 0xA900") == 2, table

        destination.status = 0x0000  # the destination fixed
        retried = gw.cli("spool", "retry", "--dead")
        assert retried.returncode == 0 and "requeued 2 route copies" in retried.stdout, retried.stdout
        wait_until(lambda: len(destination.stored) == 2, 20, 0.2, "retried copies never arrived")
        assert sorted(destination.stored) == sorted(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in first)
        wait_until(lambda: gw.health()["status"] == "ok", 10, 0.2, "still degraded")

        # A study sent under the wrong patient: withdrawn before its copies leave.
        destination.stop()
        wrong = ct_series(tmp_path / "wrong", 2, 32, 32)
        store(gw, wrong, "CT01")
        gw.wait_counts(delivered=4)
        wait_until(lambda: gw.health()["spool"]["routes"]["AI"]["counts"]["failed"] == 2, 20, 0.2, "copies not waiting")
        study_uid = str(dcmread(wrong[0], stop_before_pixels=True).StudyInstanceUID)
        discarded = gw.cli("spool", "discard", "--study", study_uid, "--yes")
        assert discarded.returncode == 0, discarded.stderr
        assert "and 2 route copies of its delivered instances" in discarded.stdout, discarded.stdout
        assert gw.health()["spool"]["routes"]["AI"]["counts"] == {
            "queued": 0, "sending": 0, "delivered": 2, "failed": 0, "dead": 0,
        }
    finally:
        destination.stop()


def test_a_route_added_by_a_reload_copies_what_comes_after(tmp_path: Path, gateway) -> None:
    with StoreSCP(tmp_path / "ai", ae_title="AI") as ai:
        gw = gateway(extra=peer("AI", ai.port))
        before, after = ct_series(tmp_path / "before", 1, 32, 32), ct_series(tmp_path / "after", 1, 32, 32)
        store(gw, before, "CT01")
        gw.wait_counts(delivered=1)
        gw.config_path.write_text(gw.config_path.read_text() + route("AI", calling_ae=["CT01"]))
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in gw.log(), 10, 0.05, "no reload logged")
        assert "dimse.routes" in gw.log() and "restart is needed" not in gw.log()
        store(gw, after, "CT01")
        wait_until(lambda: len(received(ai)) == 1, 20, 0.2, "the copy never arrived")
        assert set(received(ai)) == {str(dcmread(after[0], stop_before_pixels=True).SOPInstanceUID)}


def test_a_stow_rs_upload_is_routed_to_orthanc_by_modality(tmp_path: Path, orthanc, gateway) -> None:
    """Orthanc as the route's destination (a real PACS on its DIMSE port) and curl's
    STOW-RS as the sender: an upload through the facade is copied like a C-STORE."""
    gw = gateway(extra=peer(orthanc.aet, orthanc.dicom_port) + route(orthanc.aet, modalities=["CT"]))
    series = ct_series(tmp_path / "ct", 2, 32, 32)
    for path in series:
        result = curl("-X", "POST", "-H", "Content-Type: application/dicom", "--data-binary", f"@{path}",
                      f"{gw.web_url}/dicom-web/studies")
        assert result.status == 200, result.body
    expected = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in series}
    wait_until(lambda: orthanc.sop_instance_uids() == expected, 30, 0.2, "copies never reached Orthanc")
    gw.wait_counts(delivered=2)  # and the embedded archive has them too
    assert gw.health()["spool"]["routes"][orthanc.aet]["counts"]["delivered"] == 2


def test_a_modality_picks_a_destination_by_the_ae_title_it_calls(tmp_path: Path, gateway) -> None:
    """One gateway, two AE titles: what CT01 sends to GW_AI is also copied to the AI
    node, what it sends to the gateway's own title only archived; with
    ``check_called_ae`` an association calling neither title is rejected (PS3.8
    reason 7), and a reload adding a title makes it answer to that one too."""
    with StoreSCP(tmp_path / "ai", ae_title="AI") as ai:
        gw = gateway(dimse={"check_called_ae": True}, extra=peer("AI", ai.port) + route("AI", called_ae=["GW_AI"]))
        archived, routed = ct_series(tmp_path / "archived", 2, 32, 32), ct_series(tmp_path / "routed", 2, 32, 32)
        result = dcmtk.storescu(gw.port, archived, gw.ae_title, calling_ae="CT01")
        assert result.returncode == 0, result.stdout + result.stderr
        result = dcmtk.storescu(gw.port, routed, "GW_AI", calling_ae="CT01")
        assert result.returncode == 0, result.stdout + result.stderr
        gw.wait_counts(delivered=4)
        wait_until(lambda: len(received(ai)) == 2, 20, 0.2, "the copies never arrived")
        assert set(received(ai)) == {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in routed}
        listed = json.loads(gw.cli("spool", "list", "--called-ae", "GW_AI", "--json").stdout)
        assert sorted(r["sop_instance_uid"] for r in listed) == sorted(received(ai))

        refused = dcmtk.echoscu(gw.port, "GW_LAB", calling_ae="CT01")
        assert refused.returncode != 0
        assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
        assert value(scrape(gw), "gateway_dimse_associations_rejected_total", reason="unknown_called_ae") == 1
        assert "to GW_LAB rejected: called AE title is none of the gateway's" in gw.log()

        gw.config_path.write_text(gw.config_path.read_text() + route("AI", called_ae=["GW_LAB"]))
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in gw.log(), 10, 0.05, "no reload logged")
        assert dcmtk.echoscu(gw.port, "GW_LAB", calling_ae="CT01").returncode == 0


def test_a_peer_that_asks_for_jpeg_2000_lossless_gets_it_from_routes_and_c_move(tmp_path: Path, gateway) -> None:
    """A remote site over a slow link: its peer entry names JPEG 2000 lossless, so the
    route's copies and a C-MOVE's sub-operations go compressed (storescp +xv accepts
    it and the uncompressed syntaxes alike), pixels identical to what the modality sent."""
    with StoreSCP(tmp_path / "wan", ae_title="WAN", extra_args=["+xv"]) as wan:
        wan_peer = peer("WAN", wan.port) + 'transfer_syntaxes = ["JPEG2000Lossless"]\n'
        gw = gateway(extra=wan_peer + route("WAN", calling_ae=["CT01"]))
        series = ct_series(tmp_path / "ct", 2, 64, 64)
        store(gw, series, "CT01")
        gw.wait_counts(delivered=2)
        wait_until(lambda: len(received(wan)) == 2, 30, 0.2, "the copies never arrived")
        sent = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in series}

        def check() -> None:
            for uid, path in received(wan).items():
                got = dcmread(path)
                assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
                assert (got.pixel_array == sent[uid].pixel_array).all()

        check()
        for path in list(wan.output_dir.iterdir()):
            path.unlink()
        study = str(next(iter(sent.values())).StudyInstanceUID)
        moved = dcmtk.movescu(gw.port, gw.ae_title, "WAN", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert moved.returncode == 0, moved.stdout + moved.stderr
        wait_until(lambda: len(received(wan)) == 2, 30, 0.2, "the move never arrived")
        check()
