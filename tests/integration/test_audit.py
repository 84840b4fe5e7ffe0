"""The audit trail end to end: a real rsyslogd as the Audit Record Repository, dcmtk
tools and curl as the nodes and users, the daemon over its embedded archive. What a
security review checks: every store, query, retrieve, metadata read, deletion and
refusal arrives as a DICOM audit message naming who, what study and the outcome, the
same messages are in the audit file, and no patient name or ID is in any of them."""

from __future__ import annotations

import base64
import getpass
import os
import signal
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

from pydicom import dcmread

from tests.support import dcmtk
from tests.support.audit_messages import event_of, file_messages, participants
from tests.support.curl import curl
from tests.support.dcmtk import StoreSCP
from tests.support.ports import closed_port, wait_until
from tests.support.rsyslog import Rsyslog, rsyslog
from tests.support.synth import ct_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


def test_what_nodes_and_users_do_reaches_the_repository_without_patient_names(tmp_path: Path, gateway) -> None:
    with rsyslog(tmp_path / "arr", udp=True) as arr, StoreSCP(tmp_path / "ws", ae_title="WS") as ws:
        audit_file = tmp_path / "audit.log"
        gw = gateway(
            dimse={"check_called_ae": True},
            http_auth={"basic_users": {"viewer": "secret"}},
            extra=(
                f'\n[audit]\nsyslog = "udp://127.0.0.1:{arr.udp_port}"\nfile = "{audit_file}"\nsource_id = "GW-AUDIT"\n'
                f'\n[[dimse.peers]]\nae_title = "WS"\nhost = "127.0.0.1"\nport = {ws.port}\n'
            ),
        )
        series = ct_series(tmp_path / "ct", 2, 32, 32)
        first = dcmread(series[0], stop_before_pixels=True)
        study, name, patient_id = str(first.StudyInstanceUID), str(first.PatientName), str(first.PatientID)

        assert dcmtk.storescu(gw.port, series, gw.ae_title, calling_ae="CT01").returncode == 0
        gw.wait_counts(delivered=2)
        found = dcmtk.findscu(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "PatientName": name, "StudyInstanceUID": ""}, calling_ae="RIS")
        assert found.returncode == 0, found.stderr
        moved = dcmtk.movescu(gw.port, gw.ae_title, "WS", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, calling_ae="RIS")
        assert moved.returncode == 0, moved.stderr
        wait_until(lambda: len(list(ws.output_dir.iterdir())) == 2, 20, 0.2, "the move never arrived")
        user = ("-u", "viewer:secret")
        qido = curl(*user, f"{gw.web_url}/dicom-web/studies?PatientName={name}&limit=5")
        assert qido.status == 200 and study.encode() in qido.body
        assert curl(*user, f"{gw.web_url}/dicom-web/studies/{study}/metadata").status == 200
        retrieved = curl(*user, "-H", "Accept: multipart/related; type=application/dicom", f"{gw.web_url}/dicom-web/studies/{study}")
        assert retrieved.status == 200
        assert curl("-u", "viewer:wrong", f"{gw.web_url}/dicom-web/studies").status == 401
        assert dcmtk.echoscu(gw.port, "NOT_US", calling_ae="CT01").returncode != 0
        assert curl(*user, "-X", "DELETE", f"{gw.web_url}/dicom-web/studies/{study}").status == 204
        assert 'gateway_audit_messages_total{result="dropped"} 0.0' in curl(*user, f"{gw.web_url}/metrics").body.decode()
        gw.stop()

        expected = 11  # start, store, find, move, qido, metadata, retrieve, 401, rejected, delete, stop
        received = arr.wait_for(expected)
        assert len(received) == expected, [r.msg[:120] for r in received]
        assert {(r.pri, r.app_name, r.msgid) for r in received} == {(85, "dicom-gateway", "IHE+RFC-3881")}
        messages = [ET.fromstring(r.msg) for r in received]
        events = [event_of(m) for m in messages]
        assert events == [
            ("110100", "E"), ("110104", "C"), ("110112", "E"), ("110104", "R"), ("110112", "E"), ("110103", "R"),
            ("110104", "R"), ("110114", "E"), ("110113", "E"), ("110105", "D"), ("110100", "E"),
        ]
        for m in messages:
            source = m.find("AuditSourceIdentification")
            assert source is not None and source.get("AuditSourceID") == "GW-AUDIT"

        _start, store, find, move, qido_msg, metadata, wado, login, rejected, deleted, _stop = messages
        # C-STORE: CT01 sent two CT images of the study; the gateway took them.
        assert participants(store)["CT01"].get("UserIsRequestor") == "true"
        (obj,) = store.findall("ParticipantObjectIdentification")
        assert obj.get("ParticipantObjectID") == study
        assert [(c.get("UID"), c.get("NumberOfInstances")) for c in obj.iter("SOPClass")] == [(CT_IMAGE_STORAGE, "2")]
        # C-FIND: the query kept, its patient name emptied.
        query = find.find("ParticipantObjectIdentification")
        assert query is not None and query.get("ParticipantObjectID") == STUDY_ROOT_FIND
        asked = base64.b64decode(query.findtext("ParticipantObjectQuery") or "")
        assert b"\x10\x00\x10\x00" in asked and name.encode() not in asked  # (0010,0010) asked, value gone
        # C-MOVE: RIS asked, WS received, the study named.
        assert {"RIS", "WS"} <= participants(move).keys()
        assert move.find("ParticipantObjectIdentification").get("ParticipantObjectID") == study  # type: ignore[union-attr]
        # QIDO-RS, metadata and retrieve by the Basic user; the name not in the query kept.
        asked = base64.b64decode(qido_msg.find("ParticipantObjectIdentification").findtext("ParticipantObjectQuery") or "")  # type: ignore[union-attr]
        assert asked.startswith(b"/dicom-web/studies?") and b"PatientName=" in asked and b"limit=5" in asked
        for m in (qido_msg, metadata, wado, deleted):
            assert "viewer" in participants(m)
        assert metadata.find("ParticipantObjectIdentification").get("ParticipantObjectID") == study  # type: ignore[union-attr]
        # Refusals: the wrong password, the association calling a title not ours.
        assert "basic user viewer" in participants(login)
        assert login.find("EventIdentification").get("EventOutcomeIndicator") == "4"  # type: ignore[union-attr]
        assert "CT01" in participants(rejected)
        assert "NOT_US" in ET.tostring(rejected, encoding="unicode")

        # The file holds the same messages, readable by its owner only.
        assert stat.S_IMODE(os.stat(audit_file).st_mode) == 0o600
        lines = audit_file.read_text(encoding="utf-8").splitlines()
        assert len(lines) == expected
        everything = audit_file.read_text(encoding="utf-8") + "".join(r.msg for r in received)
        for phi in (name, patient_id, name.replace("^", " ")):
            assert phi not in everything
            assert phi.encode() not in b"".join(base64.b64decode(q.text or "") for m in messages for q in m.iter("ParticipantObjectQuery"))


def test_a_repository_that_is_down_degrades_health_and_loses_nothing(tmp_path: Path, gateway) -> None:
    """The repository is down when the gateway starts: stores are answered as ever,
    /healthz names the audit trail, and once the repository comes up every message
    kept meanwhile arrives, in order, and health is ok again."""
    arr = Rsyslog(tmp_path / "arr", tcp=True)  # its port chosen, nothing listening yet
    gw = gateway(extra=f'\n[audit]\nsyslog = "tcp://127.0.0.1:{arr.tcp_port}"\n')
    try:
        for n in range(3):
            result = dcmtk.storescu(gw.port, ct_series(tmp_path / f"ct{n}", 1, 16, 16), gw.ae_title, calling_ae="CT01")
            assert result.returncode == 0, result.stderr
        wait_until(lambda: any(p["component"] == "audit trail" for p in gw.health()["problems"]), 10, 0.1, "not degraded")
        health = gw.health()
        assert health["status"] == "degraded"
        (problem,) = [p for p in health["problems"] if p["component"] == "audit trail"]
        assert "ConnectionRefusedError" in problem["reason"]

        arr.start()
        received = arr.wait_for(4, timeout=60)  # start, three associations; backoff up to 30 s
        assert [event_of(ET.fromstring(r.msg)) for r in received] == [("110100", "E")] + [("110104", "C")] * 3
        wait_until(lambda: gw.health()["status"] == "ok", 10, 0.1, "still degraded")
    finally:
        arr.stop()


def test_what_leaves_on_its_own_is_audited_too(tmp_path: Path, orthanc, gateway) -> None:
    """Instances the gateway sends of its own accord: delivered to a remote archive
    (Orthanc's DICOMweb), copied by a route to another node (storescp). The gateway
    is the source and the requestor of both."""
    with rsyslog(tmp_path / "arr", udp=True) as arr, StoreSCP(tmp_path / "ai", ae_title="AI") as ai:
        gw = gateway(
            upstream_url=orthanc.dicomweb_url,
            extra=(
                f'\n[audit]\nsyslog = "udp://127.0.0.1:{arr.udp_port}"\n'
                f'\n[[dimse.peers]]\nae_title = "AI"\nhost = "127.0.0.1"\nport = {ai.port}\n'
                '\n[[dimse.routes]]\ndestination = "AI"\n'
            ),
        )
        series = ct_series(tmp_path / "ct", 2, 32, 32)
        study = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
        assert dcmtk.storescu(gw.port, series, gw.ae_title, calling_ae="CT01").returncode == 0
        gw.wait_counts(delivered=2)
        wait_until(lambda: len(list(ai.output_dir.iterdir())) == 2, 20, 0.2, "the copies never arrived")

        def sent_to() -> dict[str, int] | None:
            """Instances per destination over the transfer messages so far (the spool
            may deliver and copy a study in more than one batch)."""
            totals: dict[str, int] = {}
            for r in arr.messages():
                m = ET.fromstring(r.msg)
                if event_of(m) != ("110104", "R"):
                    continue
                roles = {p.find("RoleIDCode").get("csd-code"): p for p in m.findall("ActiveParticipant")}  # type: ignore[union-attr]
                source, destination = roles["110153"], roles["110152"]
                assert source.get("UserIsRequestor") == "true" and source.get("AlternativeUserID") == f"AETITLES={gw.ae_title}"
                obj = m.find("ParticipantObjectIdentification")
                assert obj is not None and obj.get("ParticipantObjectID") == study
                name = destination.get("UserID", "")
                totals[name] = totals.get(name, 0) + sum(int(c.get("NumberOfInstances", "0")) for c in obj.iter("SOPClass"))
            return totals if totals == {orthanc.dicomweb_url: 2, "AI": 2} else None

        wait_until(sent_to, 10, 0.1, "the delivery and the copies were not audited")


def test_an_admin_discarding_a_study_is_audited_as_its_deletion(tmp_path: Path, gateway) -> None:
    """`spool discard --yes` takes a study's undelivered instances out for good: the
    CLI writes that to the audit trail itself, naming the operating-system user."""
    audit_file = tmp_path / "audit.log"
    gw = gateway(
        upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web",  # nothing delivered: the study stays queued
        # One attempt, then none while the CLI runs: an instance being sent is left alone.
        spool={"retry_base_seconds": 600, "retry_max_seconds": 600},
        extra=f'\n[audit]\nfile = "{audit_file}"\n',
    )
    series = ct_series(tmp_path / "ct", 2, 16, 16)
    study = str(dcmread(series[0], stop_before_pixels=True).StudyInstanceUID)
    assert dcmtk.storescu(gw.port, series, gw.ae_title, calling_ae="CT01").returncode == 0
    gw.wait_counts(failed=2)
    result = gw.cli("spool", "discard", "--study", study, "--yes")
    assert result.returncode == 0 and "discarded 2" in result.stdout, result.stdout + result.stderr

    def deletion() -> ET.Element | None:
        return next((m for m in file_messages(audit_file) if event_of(m) == ("110105", "D")), None)

    message = wait_until(deletion, 10, 0.1, "no deletion audited")
    assert getpass.getuser() in participants(message)
    assert message.find("ParticipantObjectIdentification").get("ParticipantObjectID") == study  # type: ignore[union-attr]
    assert "spool discard: 2 undelivered instance(s) withdrawn" in (message.findtext("EventIdentification/EventOutcomeDescription") or "")


def test_a_reload_moves_the_audit_trail_without_losing_a_message(tmp_path: Path, gateway) -> None:
    """SIGHUP with [audit] pointing elsewhere: what was recorded before goes to the old
    file, what follows to the new one, and the metrics count on across the two."""
    first, second = tmp_path / "audit-1.log", tmp_path / "audit-2.log"
    gw = gateway(extra=f'\n[audit]\nfile = "{first}"\n')
    assert dcmtk.storescu(gw.port, ct_series(tmp_path / "a", 1, 16, 16), gw.ae_title, calling_ae="CT01").returncode == 0
    wait_until(lambda: first.exists() and len(first.read_text().splitlines()) >= 2, 10, 0.1, "start and store not audited")
    before = len(first.read_text().splitlines())
    gw.config_path.write_text(gw.config_path.read_text().replace(str(first), str(second)))
    os.kill(gw.proc.pid, signal.SIGHUP)  # type: ignore[union-attr]
    wait_until(lambda: "configuration reloaded" in gw.log(), 10, 0.1, "no reload logged")
    assert "audit.file" in [line for line in gw.log().splitlines() if "configuration reloaded" in line][-1]
    assert dcmtk.storescu(gw.port, ct_series(tmp_path / "b", 1, 16, 16), gw.ae_title, calling_ae="CT02").returncode == 0
    wait_until(lambda: second.exists() and "CT02" in second.read_text(), 10, 0.1, "the store after the reload not audited")
    assert len(first.read_text().splitlines()) == before and "CT02" not in first.read_text()
    metrics = curl(f"{gw.web_url}/metrics").body.decode()
    assert f'gateway_audit_messages_total{{result="sent"}} {before + 1}.0' in metrics, metrics
