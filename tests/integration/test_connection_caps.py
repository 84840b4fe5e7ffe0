"""A flood of connections that say nothing: each listener holds at most its
``max_connections``, closes the rest as soon as they are accepted, says so in one
warning, and serves again once the flood ends. Before, every connection was kept until
its timeout: with the daemon's descriptors gone, asyncio logged a traceback per failed
accept (1,529 in seven seconds) and the spool could open no file."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import dcmtk
from tests.support.ports import wait_until


def _refused(gw, listener: str) -> float:  # type: ignore[no-untyped-def]
    with urllib.request.urlopen(f"{gw.web_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = f'gateway_connections_refused_total{{listener="{listener}"}} '
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(wanted))


def _closed_at_once(port: int) -> bool:
    """Whether a new connection to ``port`` is closed by the other end within 2 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        return _closed(sock, 2)


def _open_files(gw) -> int:  # type: ignore[no-untyped-def]
    return len(os.listdir(f"/proc/{gw.proc.pid}/fd"))


def _closed(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _hold(port: int, count: int) -> list[socket.socket]:
    """``count`` connections the listener keeps; one it closed at once (while the
    start-up check's connection still counted) is replaced."""
    held: list[socket.socket] = []
    for _ in range(count * 10):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if _closed(sock, 0.2):
            sock.close()
            continue
        held.append(sock)
        if len(held) == count:
            return held
    raise AssertionError(f"the listener kept {len(held)} of {count} connections")


def _fill_then_flood(gw, port: int) -> list[socket.socket]:  # type: ignore[no-untyped-def]
    """Hold the cap's four connections, then open 200 more: none is kept (the daemon's
    descriptors say so). Returns the four held."""
    held = _hold(port, 4)
    baseline = _open_files(gw) - 4
    assert _closed_at_once(port), "a fifth connection was kept"
    flood = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(200)]
    wait_until(lambda: _open_files(gw) <= baseline + 4, 10, 0.1, "the flood's connections were kept")
    for sock in flood:
        sock.close()
    return held


def test_dimse_connections_past_the_cap_are_closed_at_once(tmp_path: Path, gateway) -> None:
    gw = gateway(dimse={"max_associations": 2, "max_connections": 4})
    held = _fill_then_flood(gw, gw.port)
    try:
        assert dcmtk.echoscu(gw.port, gw.ae_title, timeout=10).returncode != 0
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: dcmtk.echoscu(gw.port, gw.ae_title, timeout=10).returncode == 0, 10, 0.2, "not served again")
    warnings = [line for line in gw.log().splitlines() if "dimse.max_connections (4) open already" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], warnings
    assert _refused(gw, "dimse") >= 202 and _refused(gw, "http") == 0
    # the held connections, closed without a byte, were port checks: no warning each
    assert "before association" not in gw.log() and "Traceback" not in gw.log()


def test_http_connections_past_the_cap_are_closed_at_once(tmp_path: Path, gateway) -> None:
    gw = gateway(http={"max_connections": 4})
    held = _fill_then_flood(gw, gw.http_port)
    try:
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"{gw.web_url}/healthz", timeout=5)
        assert dcmtk.echoscu(gw.port, gw.ae_title, timeout=10).returncode == 0  # DIMSE has its own cap
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _refused(gw, "http") >= 202, 10, 0.2, "not served again")
    warnings = [line for line in gw.log().splitlines() if "http.max_connections (4) open already" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], warnings
    assert _refused(gw, "dimse") == 0
    assert "Traceback" not in gw.log()
