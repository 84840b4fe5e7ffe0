"""The embedded archive's writer process (`gateway.upstream.archive_writer`): killed
while it stores, nothing is lost; it stops with the daemon, however the daemon ends."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.support import dcmtk
from tests.support.daemon import Gateway
from tests.support.ports import wait_until
from tests.support.synth import ct_series

WRITER = "gateway.upstream.archive_writer"


def writers(gw: Gateway) -> list[int]:
    """Pids of the daemon's writer processes."""
    assert gw.proc is not None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == gw.proc.pid and WRITER.encode() in cmdline:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_writer_killed_while_storing_loses_nothing(tmp_path: Path, gateway) -> None:
    """The writer is frozen (SIGSTOP) while instances arrive, so a batch is surely in its
    hands (rows ``sending``) when it is SIGKILLed: that batch comes back ``retry``, a new
    writer stores it, and the archive ends with every instance sent, once."""
    gw = gateway()
    (first,) = writers(gw)
    os.kill(first, signal.SIGSTOP)
    try:
        sent = dcmtk.storescu(gw.port, ct_series(tmp_path / "ct", 20, rows=64, columns=64), gw.ae_title)
        assert sent.returncode == 0, sent.stderr  # acknowledged: the spool holds them
        wait_until(lambda: gw.counts().get("sending", 0) > 0, 30, 0.05, "no batch handed to the writer")
    finally:
        os.kill(first, signal.SIGKILL)
    gw.wait_counts(delivered=20, timeout=60)
    wait_until(lambda: gw.health()["upstream"]["detail"] == "embedded archive, 20 instances", 20, 0.5)
    (second,) = writers(gw)
    assert second != first
    log = gw.log()
    assert "writer process ended" in log and "Traceback" not in log


def test_the_writer_ends_with_the_daemon(tmp_path: Path, gateway) -> None:
    """SIGTERM to the whole process group (what systemd sends): the writer ignores it,
    the daemon stops it after its last batch and exits 0. SIGKILL of the daemon alone:
    the writer sees its pipe close and ends by itself."""
    gw = gateway()
    (writer,) = writers(gw)
    assert dcmtk.storescu(gw.port, ct_series(tmp_path / "a", 5, rows=64, columns=64), gw.ae_title).returncode == 0
    gw.wait_counts(delivered=5)
    assert gw.stop() == 0
    assert not alive(writer)

    gw.start()
    (writer,) = writers(gw)
    assert gw.proc is not None
    gw.proc.kill()  # the daemon alone, no shutdown code
    gw.proc.wait()
    deadline = time.monotonic() + 10
    while alive(writer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(writer)
