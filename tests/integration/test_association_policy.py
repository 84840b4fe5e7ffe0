"""Association policy with real dcmtk peers: allow-list, limits, contexts."""

from __future__ import annotations

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
