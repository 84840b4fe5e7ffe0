"""The audit trail against a real syslog receiver (rsyslogd over UDP, TCP and TLS) and
a real file: every message arrives as RFC 5424 with parseable XML, a repository restart
loses nothing, a certificate that does not verify is reported, the file survives
rotation, and a full queue drops instead of blocking the caller."""

from __future__ import annotations

import os
import ssl
import stat
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from gateway.audit.message import (
    SUCCESS,
    AuditEvent,
    Participant,
    QueryObject,
    StudyObject,
    application_activity,
    instances_transferred,
    query,
)
from gateway.audit.trail import APP_NAME, MSGID, PRI, QUEUE_SIZE, AuditTrail
from gateway.config import AuditConfig
from tests.support.pki import Pki
from tests.support.ports import closed_port, wait_until
from tests.support.rsyslog import Received, TlsFiles, rsyslog

MODALITY = Participant("CT01", True, "10.1.2.3", alternative_user_id="AETITLES=CT01")
GATEWAY = Participant("4242", False, "gateway.example.org", user_name="GATEWAY")


def transfer(n: int) -> AuditEvent:
    """A distinct event per ``n``, with a non-ASCII description to check UTF-8 travels."""
    study = StudyObject(f"1.2.3.{n}", (("1.2.840.10008.5.1.4.1.1.2", n + 1),))
    return instances_transferred("C", SUCCESS, MODALITY, GATEWAY, [study], f"Größe {n}")


def study_uids(messages: list[Received]) -> list[str]:
    return [ET.fromstring(m.msg).find("ParticipantObjectIdentification").get("ParticipantObjectID") for m in messages]


def test_udp_messages_arrive_as_rfc5424_with_dicom_xml(tmp_path: Path) -> None:
    with rsyslog(tmp_path / "rsyslog", udp=True) as server:
        trail = AuditTrail(AuditConfig(syslog=f"udp://127.0.0.1:{server.udp_port}"), "GW_AE", hostname="gw01")
        for n in range(5):
            trail.record(transfer(n))
        trail.record(query(SUCCESS, MODALITY, GATEWAY, QueryObject("1.2.840.10008.5.1.4.1.2.2.1", b"PatientID=")))
        received = server.wait_for(6)
        trail.close()
    assert (trail.sent, trail.dropped, trail.failed, trail.last_error) == (6, 0, 0, "")
    assert {(m.pri, m.app_name, m.msgid, m.procid, m.hostname) for m in received} == {
        (PRI, APP_NAME, MSGID, str(os.getpid()), "gw01")
    }
    roots = [ET.fromstring(m.msg) for m in received]
    assert all(r.tag == "AuditMessage" and r.find("AuditSourceIdentification").get("AuditSourceID") == "GW_AE" for r in roots)
    transfers = [r for r in roots if r.find("EventIdentification/EventID").get("csd-code") == "110104"]
    descriptions = sorted(r.findtext("EventIdentification/EventOutcomeDescription") for r in transfers)
    assert descriptions == [f"Größe {n}" for n in range(5)]
    # The syslog TIMESTAMP is the event's time, with its UTC offset.
    assert all(m.timestamp[:19] == r.find("EventIdentification").get("EventDateTime")[:19] for m, r in zip(received, roots))


def test_tcp_repository_restart_loses_nothing(tmp_path: Path) -> None:
    with rsyslog(tmp_path / "rsyslog", tcp=True) as server:
        trail = AuditTrail(AuditConfig(syslog=f"tcp://127.0.0.1:{server.tcp_port}"), "GW")
        for n in range(10):
            trail.record(transfer(n))
        server.wait_for(10)
        server.stop()
        for n in range(10, 30):
            trail.record(transfer(n))
        wait_until(lambda: trail.failed > 0, message="no failed attempt while the repository was down")
        assert "refused" in trail.last_error.lower()
        assert trail.sent == 10
        server.start()
        received = server.wait_for(30, timeout=15)
        trail.close()
    assert study_uids(received) == [f"1.2.3.{n}" for n in range(30)]
    assert (trail.sent, trail.dropped, trail.last_error) == (30, 0, "")


def tls_files(pki: Pki) -> TlsFiles:
    d = pki.directory
    return TlsFiles(d / "ca.crt", d / "server.crt", d / "server.key")


def test_tls_verifies_the_repository_certificate(tmp_path: Path, pki: Pki) -> None:
    with rsyslog(tmp_path / "rsyslog", tls=tls_files(pki)) as server:
        trusting = ssl.create_default_context(cafile=pki.directory / "ca.crt")
        trail = AuditTrail(AuditConfig(syslog=f"tls://127.0.0.1:{server.tcp_port}"), "GW", tls_context=trusting)
        for n in range(3):
            trail.record(transfer(n))
        received = server.wait_for(3)
        trail.close()
        assert study_uids(received) == ["1.2.3.0", "1.2.3.1", "1.2.3.2"]
        assert (trail.sent, trail.failed) == (3, 0)

        stranger = ssl.create_default_context(cafile=pki.directory / "other_ca.crt")
        refused = AuditTrail(AuditConfig(syslog=f"tls://127.0.0.1:{server.tcp_port}"), "GW", tls_context=stranger)
        refused.record(transfer(9))
        wait_until(lambda: refused.failed > 0, message="a certificate of another CA was accepted")
        assert "certificate verify failed" in refused.last_error
        refused.close(timeout=0.2)
        assert refused.sent == 0 and refused.dropped == 1
        assert len(server.messages()) == 3


def test_file_is_private_one_line_per_message_and_follows_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail(AuditConfig(file=path), "GW", hostname="gw01")
    for n in range(3):
        trail.record(transfer(n))
    wait_until(lambda: trail.sent == 3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.rename(tmp_path / "audit.log.1")  # what logrotate does
    for n in range(3, 5):
        trail.record(transfer(n))
    wait_until(lambda: trail.sent == 5)
    path.unlink()  # removed outright: a new file is made
    trail.record(transfer(5))
    trail.close()
    rotated = (tmp_path / "audit.log.1").read_bytes().decode().splitlines()
    current = path.read_bytes().decode().splitlines()
    assert (len(rotated), len(current)) == (3, 1)
    assert study_uids_of_lines(current) == ["1.2.3.5"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for line in rotated + current:
        assert line.startswith(f"<{PRI}>1 ") and f" gw01 {APP_NAME} {os.getpid()} {MSGID} - <AuditMessage>" in line
        ET.fromstring(line.split(" - ", 1)[1])
    assert (trail.sent, trail.dropped, trail.failed) == (6, 0, 0)


def study_uids_of_lines(lines: list[str]) -> list[str]:
    return [
        ET.fromstring(line.split(" - ", 1)[1]).find("ParticipantObjectIdentification").get("ParticipantObjectID")
        for line in lines
    ]


def test_full_queue_drops_and_counts_without_blocking() -> None:
    trail = AuditTrail(AuditConfig(syslog=f"tcp://127.0.0.1:{closed_port()}"), "GW")
    event = application_activity(True, GATEWAY)
    start = time.perf_counter()
    for _ in range(2 * QUEUE_SIZE):
        trail.record(event)
    elapsed = time.perf_counter() - start
    # Nothing is ever sent, so the queue holds exactly QUEUE_SIZE and the rest is dropped.
    assert elapsed < 0.5, elapsed
    assert (trail.sent, trail.dropped) == (0, QUEUE_SIZE)
    wait_until(lambda: trail.failed > 0)
    assert "refused" in trail.last_error.lower()
    trail.close(timeout=0.2)
    assert trail.dropped == 2 * QUEUE_SIZE  # what close could not send is lost, and counted


def test_a_message_too_big_for_udp_is_dropped_not_retried_forever(tmp_path: Path) -> None:
    with rsyslog(tmp_path / "rsyslog", udp=True) as server:
        trail = AuditTrail(AuditConfig(syslog=f"udp://127.0.0.1:{server.udp_port}"), "GW")
        huge = instances_transferred("C", SUCCESS, MODALITY, GATEWAY, [], "x" * 70_000)
        trail.record(huge)
        trail.record(transfer(1))
        received = server.wait_for(1)
        trail.close()
    assert study_uids(received) == ["1.2.3.1"]
    assert (trail.sent, trail.dropped, trail.failed) == (1, 1, 1)
