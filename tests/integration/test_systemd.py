"""The systemd side: the notify protocol spoken by a real daemon to a NOTIFY_SOCKET the
test opens (READY=1 once both ports accept connections, WATCHDOG=1 at half of
WATCHDOG_USEC, STATUS= with the spool counts), and the unit file as systemd-analyze
and systemd-sysusers read it."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import REPO, Gateway
from tests.support.dcmtk import storescu
from tests.support.ports import port_is_open, wait_until
from tests.support.synth import ct_series

UNIT = REPO / "systemd" / "dicom-gateway.service"
SYSUSERS = REPO / "systemd" / "dicom-gateway.sysusers.conf"


class NotifyListener:
    """A unix datagram socket standing in for systemd's: every message, with the time it
    came and, for READY=1, whether both of the daemon's ports accepted a connection then."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self.ports: tuple[int, int] | None = None
        self.ports_open_at_ready: bool | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            for line in data.decode().splitlines():
                if line == "READY=1" and self.ports is not None:
                    self.ports_open_at_ready = all(port_is_open("127.0.0.1", p) for p in self.ports)
                self.messages.append((now, line))

    def lines(self, prefix: str) -> list[tuple[float, str]]:
        return [(t, m) for t, m in self.messages if m.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_listener() -> Iterator[NotifyListener]:
    # A short directory: a unix socket path must fit in 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    listener = NotifyListener(directory)
    try:
        yield listener
    finally:
        listener.close()
        shutil.rmtree(directory, ignore_errors=True)


def test_ready_watchdog_and_status_over_notify_socket(tmp_path: Path, notify_listener: NotifyListener) -> None:
    gw = Gateway(
        tmp_path / "gw", env={"NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": "1000000"}
    )
    notify_listener.ports = (gw.port, gw.http_port)
    try:
        gw.start()
        wait_until(lambda: notify_listener.lines("READY=1"), 10, 0.05, "no READY=1")
        assert notify_listener.ports_open_at_ready is True
        ready_at = notify_listener.lines("READY=1")[0][0]

        files = ct_series(tmp_path / "ct", 2, rows=16, columns=16)
        assert storescu(gw.port, files, gw.ae_title).returncode == 0
        gw.wait_counts(delivered=2)
        wait_until(
            lambda: any("2 delivered" in m for _, m in notify_listener.lines("STATUS=")), 12, 0.1,
            "no STATUS= with the delivered count",
        )
        status = [m for _, m in notify_listener.lines("STATUS=") if "2 delivered" in m][-1]
        assert re.fullmatch(
            r"STATUS=spool: 0 queued, 0 sending, 2 delivered, 0 failed, 0 dead; \d+ association\(s\) open", status
        ), status

        # Half of WATCHDOG_USEC apart, from READY=1 on, for as long as the daemon runs.
        beats = [t for t, _ in notify_listener.lines("WATCHDOG=1")]
        assert len(beats) >= 4, beats
        assert beats[0] <= ready_at + 0.2
        gaps = [b - a for a, b in zip(beats, beats[1:])]
        assert all(0.3 <= g <= 1.0 for g in gaps), gaps
        assert time.monotonic() - beats[-1] < 1.0
        assert gw.stop() == 0
        assert notify_listener.lines("STOPPING=1")
    finally:
        gw.kill()


def test_no_watchdog_without_watchdog_usec(tmp_path: Path, notify_listener: NotifyListener) -> None:
    gw = Gateway(tmp_path / "gw", env={"NOTIFY_SOCKET": str(notify_listener.path)})
    try:
        gw.start()
        wait_until(lambda: notify_listener.lines("STATUS="), 10, 0.05, "no STATUS=")
        time.sleep(1.0)
        assert notify_listener.lines("READY=1") and not notify_listener.lines("WATCHDOG=1")
    finally:
        gw.kill()


def test_unit_file_verifies(tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart's binary exists; the unit names
    the installed /usr/local/bin/dicom-gateway, so a copy runs this checkout instead."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "dicom-gateway.service"
    text = UNIT.read_text()
    for needed in ("Type=notify", "WatchdogSec=", "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=dicom-gateway", "LogsDirectory=dicom-gateway",
                   "ProtectSystem=strict", "NoNewPrivileges=true", "PrivateTmp=true",
                   "AmbientCapabilities=CAP_NET_BIND_SERVICE", "User=dicom-gateway"):
        assert needed in text, needed
    unit.write_text(text.replace("/usr/local/bin/dicom-gateway", f"{sys.executable} -m gateway"))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed")
    (tmp_path / "etc").mkdir()
    result = subprocess.run([sysusers, f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    entry = next(line for line in (tmp_path / "etc" / "passwd").read_text().splitlines() if line.startswith("dicom-gateway:"))
    assert entry.endswith(":/var/lib/dicom-gateway:/usr/sbin/nologin"), entry


def _fill(path: Path) -> list[socket.socket]:
    """Fill the queue of the datagram socket at ``path`` until a new sender would wait:
    every sender's own buffer is filled too, so the daemon's is the one that waits."""
    senders: list[socket.socket] = []
    while True:
        sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sender.connect(str(path))
        sender.setblocking(False)
        senders.append(sender)
        sent = 0
        try:
            while True:
                sender.send(b"x")
                sent += 1
        except BlockingIOError:
            if sent == 0:
                return senders


def test_signals_as_readiness_is_said_stop_the_daemon_cleanly(tmp_path: Path) -> None:
    """systemd may stop or reload the daemon as soon as READY=1 arrives (a `systemctl
    stop` queued behind the start). The daemon is held at its READY=1 (the notify
    socket's queue is full, so its send waits) and sent SIGHUP and SIGTERM there; let
    go, it stops cleanly. Before, the handlers were set after READY=1 and the signal's
    default action killed it (SIGHUP: exit -1, SIGTERM: -15); a test stopping the
    daemon as soon as its port answered saw that once in some thirty runs."""
    directory = Path(tempfile.mkdtemp(prefix="notify-", dir="/tmp"))
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(directory / "notify"))
    receiver.setblocking(False)
    senders = _fill(directory / "notify")
    gw = Gateway(tmp_path / "gw", env={"NOTIFY_SOCKET": str(directory / "notify")})
    try:
        gw.start()
        wait_until(lambda: "listening:" in gw.log(), 10, 0.05, "no 'listening' line")
        time.sleep(0.3)  # in its send of READY=1, waiting for room
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert gw.proc.poll() is None, f"the daemon died of the signal: {gw.proc.returncode}"
        messages: list[bytes] = []

        def drained_and_ended() -> bool:
            try:
                while True:
                    messages.append(receiver.recv(64))
            except BlockingIOError:
                pass
            return gw.proc is not None and gw.proc.poll() is not None

        wait_until(drained_and_ended, 30, 0.05, "the daemon did not stop")
        assert gw.proc.returncode == 0, gw.log()[-2000:]
        assert b"READY=1" in messages and b"STOPPING=1" in messages
        assert "stopped" in gw.log()
    finally:
        gw.kill()
        for sock in (receiver, *senders):
            sock.close()
        shutil.rmtree(directory, ignore_errors=True)
