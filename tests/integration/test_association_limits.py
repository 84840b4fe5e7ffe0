"""Association limits per peer, and idle associations that must not hold a slot: a
raw socket holds an association, dcmtk's echoscu asks for another."""

from __future__ import annotations

import socket
import struct
import time
import urllib.request
from base64 import b64encode

from tests.support import dcmtk


def _associate_rq(called: str, calling: str) -> bytes:
    """A raw A-ASSOCIATE-RQ proposing Verification."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
        + item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


def _hold(port: int, called: str, calling: str) -> socket.socket:
    """An established association that then says nothing."""
    holder = socket.create_connection(("127.0.0.1", port), timeout=30)
    holder.sendall(_associate_rq(called, calling))
    kind, length = _read_pdu_header(holder)
    assert kind == 0x02  # A-ASSOCIATE-AC
    _read_exactly(holder, length)
    return holder


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def _read_pdu_header(sock: socket.socket) -> tuple[int, int]:
    kind, _, length = struct.unpack(">BBI", _read_exactly(sock, 6))
    return kind, length


def _rejected_count(gw, reason: str) -> float:  # type: ignore[no-untyped-def]
    request = urllib.request.Request(
        f"{gw.web_url}/metrics", headers={"Authorization": "Basic " + b64encode(b"admin:secret").decode()}
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    wanted = f'gateway_dimse_associations_rejected_total{{reason="{reason}"}} '
    return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted)), 0.0)


def test_a_peer_beyond_its_own_limit_is_rejected_transiently(gateway) -> None:
    peers = (
        '\n[[dimse.peers]]\nae_title = "MODALITY"\nhost = "127.0.0.1"\nport = 104\nmax_associations = 1\n'
        '\n[[dimse.peers]]\nae_title = "OTHER"\nhost = "127.0.0.1"\nport = 105\n'
    )
    gw = gateway(extra=peers, http_auth={"basic_users": {"admin": "secret"}})
    with _hold(gw.port, gw.ae_title, "MODALITY"):
        busy = dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="MODALITY", extra_args=("-v",))
        assert busy.returncode != 0
        assert "Local Limit Exceeded" in busy.stdout + busy.stderr
        assert "too many associations from MODALITY (its max_associations, 1)" in gw.log()
        # The limit is that peer's: another one still gets in.
        assert dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="OTHER").returncode == 0
    assert _rejected_count(gw, "too_many_associations_for_peer") == 1
    time.sleep(0.5)  # the gateway sees the holder's connection close
    assert dcmtk.echoscu(gw.port, gw.ae_title, calling_ae="MODALITY").returncode == 0


def test_an_association_silent_after_its_accept_is_aborted_and_frees_its_slot(gateway) -> None:
    gw = gateway(dimse={"max_associations": 1, "network_timeout": 1})
    with _hold(gw.port, gw.ae_title, "SILENT") as holder:
        assert dcmtk.echoscu(gw.port, gw.ae_title).returncode != 0  # the one slot is taken
        holder.settimeout(10)
        started = time.monotonic()
        assert _read_pdu_header(holder)[0] == 0x07  # A-ABORT, after network_timeout
        assert 0.5 < time.monotonic() - started < 5
        echo = dcmtk.echoscu(gw.port, gw.ae_title)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    assert "association from SILENT@127.0.0.1" in gw.log() and "aborted (network timeout)" in gw.log()
