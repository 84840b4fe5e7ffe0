"""GET /readyz on a real daemon: ready only while the spool takes a durable write and
the archive answers; otherwise 503 naming the failing check, while /healthz (liveness)
keeps answering 200."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc


def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/readyz", timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def healthz_status(gw: Gateway) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=15) as resp:
        return resp.status


def test_ready_until_the_archive_stops(orthanc: Orthanc, gateway: Callable[..., Gateway]) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    status, body = readyz(gw)
    assert (status, body["status"]) == (200, "ready"), body
    assert body["checks"]["spool"]["ok"] and body["checks"]["upstream"]["ok"]

    orthanc.stop()
    status, body = readyz(gw)
    assert (status, body["status"]) == (503, "not ready"), body
    assert body["checks"]["upstream"]["ok"] is False
    assert "unreachable" in body["checks"]["upstream"]["detail"]
    assert body["checks"]["spool"]["ok"] is True
    assert healthz_status(gw) == 200

    orthanc.start()
    assert readyz(gw)[0] == 200


def test_not_ready_while_the_spool_directory_takes_no_file(tmp_path: Path, gateway: Callable[..., Gateway]) -> None:
    """``chattr +i`` on the spool directory: no new file can be created in it, even by
    root (who ignores permission bits), while the open spool database keeps working."""
    gw = gateway()
    assert readyz(gw)[0] == 200
    if subprocess.run(["chattr", "+i", str(gw.spool_dir)], capture_output=True).returncode != 0:
        pytest.skip("the file system of the test directory has no immutable flag")
    try:
        status, body = readyz(gw)
        assert (status, body["status"]) == (503, "not ready"), body
        assert body["checks"]["spool"] == {"ok": False, "detail": "spool not writable: Operation not permitted"}
        assert body["checks"]["upstream"]["ok"] is True
        assert healthz_status(gw) == 200
    finally:
        subprocess.run(["chattr", "-i", str(gw.spool_dir)], check=True)
    assert readyz(gw)[0] == 200
    assert not list(gw.spool_dir.glob(".readyz-*"))


def test_liveness_answers_within_a_second_while_the_archive_hangs(orthanc: Orthanc, gateway: Callable[..., Gateway]) -> None:
    """Orthanc frozen (SIGSTOP: connections accepted, never answered): /healthz, the
    liveness probe, answers each time within about a second (an orchestrator's probe
    timeout is one second by default), first with the last result and its age, then
    unreachable once the probe timed out; ``spool status`` answers too; the archive
    back, ok again."""
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    assert gw.health()["upstream"]["reachable"]
    os.kill(orthanc.pid, signal.SIGSTOP)
    try:
        time.sleep(5.2)  # the last result is no longer fresh
        answers = []
        for _ in range(6):
            started = time.monotonic()
            body = gw.health()
            answers.append((time.monotonic() - started, body["upstream"]))
            time.sleep(0.5)
        assert max(took for took, _ in answers) < 1.8, answers
        assert "ago; the archive has not answered since" in answers[0][1]["detail"], answers
        assert not answers[-1][1]["reachable"] and "timeout" in answers[-1][1]["detail"], answers
        started = time.monotonic()
        status = gw.cli("spool", "status", "--json")
        assert status.returncode == 0 and time.monotonic() - started < 4, status.stderr
    finally:
        os.kill(orthanc.pid, signal.SIGCONT)
    deadline = time.monotonic() + 15
    while not gw.health()["upstream"]["reachable"]:
        assert time.monotonic() < deadline, gw.health()
        time.sleep(0.5)
