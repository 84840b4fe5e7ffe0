"""Association policy with real dcmtk peers: allow-list, limits, contexts."""

from __future__ import annotations

import json
import socket
import struct

from tests.support import dcmtk
from tests.support.corpus import sample_files

PEERS = '\n[[dimse.peers]]\nae_title = "KNOWN"\nhost = "127.0.0.1"\nport = 104\n'
READ_ONLY = '\n[[dimse.peers]]\nae_title = "VIEWER"\nhost = "127.0.0.1"\nport = 105\npermissions = ["find"]\n'


def test_unknown_calling_ae_rejected_when_required(gateway) -> None:
    gw = gateway(dimse={"require_known_peers": True}, extra=PEERS)
    assert dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="KNOWN").returncode == 0
    refused = dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="STRANGER", extra_args=("-v",))
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert "rejected" in gw.log()


def test_known_ae_from_another_host_is_rejected_unless_it_opts_out(gateway) -> None:
    """The calling address must be one the peer's host resolved to; dcmtk connects
    from 127.0.0.1, the peer is declared on 127.0.0.2."""
    elsewhere = '\n[[dimse.peers]]\nae_title = "KNOWN"\nhost = "127.0.0.2"\nport = 104\n'
    gw = gateway(dimse={"require_known_peers": True}, extra=elsewhere)
    refused = dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="KNOWN", extra_args=("-v",))
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert "calling AE title known, but from another host than 127.0.0.2" in gw.log()
    roaming = gateway(dimse={"require_known_peers": True}, extra=elsewhere + "any_host = true\n")
    assert dcmtk.echoscu(roaming.port, roaming.ae_title, calling_ae="KNOWN").returncode == 0


def _associate_rq(called: bytes, calling: bytes) -> bytes:
    """A raw A-ASSOCIATE-RQ proposing Verification, AE titles as given (16 bytes)."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called + calling + b"\x00" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user
    return struct.pack(">BBI", 1, 0, len(body)) + body


def test_a_newline_in_an_ae_title_cannot_forge_a_log_line(gateway) -> None:
    gw = gateway(dimse={"require_known_peers": True}, extra=PEERS)
    with socket.create_connection(("127.0.0.1", gw.port)) as peer:
        peer.sendall(_associate_rq(gw.ae_title.ljust(16).encode(), b"X\nFORGED INFO x".ljust(16)))
        assert peer.recv(1)[0] == 0x03  # A-ASSOCIATE-RJ
    lines = gw.log().splitlines()
    assert not any(line.startswith("FORGED") for line in lines)
    assert any("X\\nFORGED INFO x" in line and "calling AE title not in dimse.peers" in line for line in lines)


def test_json_log_lines_carry_the_association_fields(gateway) -> None:
    gw = gateway(run_args=("--log-format", "json"))
    assert dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="JSONPEER").returncode == 0
    gw.stop()
    records = [json.loads(line) for line in gw.log().splitlines() if line.strip()]
    ended = [r for r in records if r.get("event") == "association"]
    assert ended and ended[0]["calling_ae"] == "JSONPEER" and ended[0]["echo"] == 1 and ended[0]["end"] == "released"
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)


def test_peer_without_store_permission_is_refused(gateway) -> None:
    gw = gateway(extra=READ_ONLY)
    result = dcmtk.storescu(gw.port, sample_files()[:1], gw.ae_title, calling_ae="VIEWER", extra_args=("-v",))
    assert result.returncode != 0
    assert "No Acceptable Presentation Contexts" in result.stderr
    assert sum(gw.counts().values()) == 0
    # The same peer may still verify the connection.
    assert dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="VIEWER").returncode == 0


def test_association_limit_rejects_transiently(gateway) -> None:
    gw = gateway(dimse={"max_associations": 1})
    # Hold one association open with a raw A-ASSOCIATE-RQ proposing Verification.
    called, calling = gw.ae_title.ljust(16).encode(), b"HOLDER".ljust(16)
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + called + calling + b"\x00" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user
    with socket.create_connection(("127.0.0.1", gw.port)) as holder:
        holder.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
        assert holder.recv(1)[0] == 0x02  # A-ASSOCIATE-AC
        busy = dcmtk.echoscu(gw.port, gw.ae_title, extra_args=("-v",))
        assert busy.returncode != 0
        assert "Local Limit Exceeded" in busy.stdout + busy.stderr
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
