"""Delivery faults that are the gateway's own: its spool database failing under a running
forwarder, and an archive that refuses the gateway's credentials or URL."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support import dcmtk
from tests.support.ports import wait_until
from tests.support.synth import ct_series


def spool_rows(spool_dir: Path) -> list[tuple[int, str]]:
    """(id, state) of every spool row, read the way an admin's sqlite3 would."""
    with sqlite3.connect(spool_dir / "spool.sqlite", timeout=10) as conn:
        return list(conn.execute("SELECT id, state FROM instances ORDER BY id"))


def problem_reasons(health: dict) -> str:
    return " | ".join(str(p.get("reason", "")) for p in health.get("problems", []))


@pytest.mark.slow
def test_forwarder_survives_a_locked_spool_database(tmp_path: Path, orthanc, gateway) -> None:
    """The archive stores a batch while the spool database is locked by someone else:
    recording the outcome fails, the worker keeps it and retries, /healthz says why it
    is degraded, and everything ends delivered with nothing left in ``sending``."""
    gw = gateway(
        upstream_url=orthanc.dicomweb_url,
        spool={"busy_timeout": 0.5, "concurrency": 2, "batch_max_instances": 5, "batch_linger_ms": 0},
    )
    files = ct_series(tmp_path / "ct", 20, rows=64, columns=64)
    uids = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert orthanc.pid is not None
    os.kill(orthanc.pid, signal.SIGSTOP)  # the archive hangs: batches stay in flight
    lock: sqlite3.Connection | None = None
    try:
        result = dcmtk.storescu(gw.port, files, gw.ae_title)
        assert result.returncode == 0, result.stdout + result.stderr

        def both_workers_sending() -> list[int]:
            rows = spool_rows(gw.spool_dir)
            sending = [i for i, state in rows if state == "sending"]
            done = len(rows) == 20 and all(s in ("sending", "queued") for _, s in rows)
            return sending if done and len(sending) >= 2 else []

        in_flight = wait_until(both_workers_sending, 20, 0.1, "the forwarder never claimed two batches")
        time.sleep(0.5)  # let the second batch's request leave too
        in_flight = [i for i, state in spool_rows(gw.spool_dir) if state == "sending"]

        # Someone else (an admin's sqlite3, a backup) holds the write lock for a while.
        lock = sqlite3.connect(gw.spool_dir / "spool.sqlite", timeout=10, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        os.kill(orthanc.pid, signal.SIGCONT)
        wait_until(lambda: orthanc.instance_count() >= len(in_flight), 30, 0.2, "the archive never stored the batches")
        seen: list[dict] = []
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline:
            seen.append(gw.health())
            time.sleep(0.5)
        assert gw.running, gw.log()
        lock.rollback()
        lock.close()
        lock = None
    finally:
        os.kill(orthanc.pid, signal.SIGCONT)
        if lock is not None:
            lock.close()

    gw.wait_counts(delivered=20, timeout=60)
    assert [s for _, s in spool_rows(gw.spool_dir)] == ["delivered"] * 20
    assert orthanc.sop_instance_uids() == uids
    reasons = [problem_reasons(h) for h in seen if h["status"] == "degraded"]
    assert any("locked" in r for r in reasons), seen[-1]
    log = gw.log()
    failures = [line for line in log.splitlines() if "cannot record" in line]
    assert len(failures) >= 2, log  # retried, not given up
    logged_ids = {int(n) for line in failures for m in re.findall(r"spool ids ([\d, ]+)", line) for n in m.split(",")}
    assert set(in_flight) <= logged_ids, failures
    wait_until(lambda: gw.health()["status"] == "ok", 20, 0.5, "healthz never recovered")
    assert "Traceback" not in log, log
