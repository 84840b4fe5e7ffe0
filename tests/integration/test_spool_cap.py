"""``spool.max_size_mb`` on a real daemon: with the archive down the spool fills to its
cap and C-STORE gets 0xA700 (never a dropped association), /readyz and the gauge say the
cap is near; once the archive is back, delivered files are evicted (long before
``retain_delivered_hours``) and the refused instances go in."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_metrics import scrape, value
from tests.support.daemon import Gateway
from tests.support.orthanc import Orthanc
from tests.support.ports import wait_until
from tests.support.pyscu import send_files
from tests.support.synth import ct_series

MiB = 2**20


def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/readyz", timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_cap_refuses_with_a700_and_eviction_of_delivered_files_makes_room(
    tmp_path: Path, orthanc: Orthanc, gateway: Callable[..., Gateway]
) -> None:
    files = ct_series(tmp_path / "ct", 41, rows=128, columns=128)  # ~33 KiB each
    orthanc.stop()  # the archive is down: nothing can be delivered, so nothing evicted
    gw = gateway(upstream_url=orthanc.dicomweb_url, spool={"max_size_mb": 1})

    statuses = send_files(gw.port, files[:40], gw.ae_title)
    stored = statuses.count(0x0000)
    assert 28 <= stored <= 32, statuses
    assert statuses == [0x0000] * stored + [0xA700] * (40 - stored), statuses
    # one association, released, not dropped (its summary is logged once it is closed,
    # which may be just after the sender returned)
    wait_until(lambda: f"{stored} stored, {40 - stored} failed" in gw.log(), 10, 0.05, "no association summary")
    assert "over its cap of 1 MiB" in gw.log()

    status, body = readyz(gw)
    assert status == 503 and body["checks"]["disk"] == {"ok": False, "detail": "spool within 10 % of spool.max_size_mb"}
    samples = scrape(gw)
    assert value(samples, "gateway_spool_limit_near", limit="cap") == 1
    assert value(samples, "gateway_spool_limit_near", limit="floor") == 0
    assert value(samples, "gateway_spool_max_bytes") == MiB
    assert 0.9 * MiB <= value(samples, "gateway_spool_used_bytes") <= MiB
    assert value(samples, "gateway_dimse_request_duration_seconds_count", command="C-STORE", status="0xA700") == 40 - stored

    orthanc.start()
    wait_until(lambda: orthanc.instance_count() == stored, 30, 0.2, "the spooled instances never reached the archive")
    # Delivered, then evicted down to 80 % of the cap although retained for 24 h.
    wait_until(lambda: "evicted" in gw.log(), 10, 0.1, "no eviction logged")
    assert value(scrape(gw), "gateway_spool_used_bytes") <= 0.8 * MiB

    # Each instance taken is delivered and makes room in turn.
    rest = files[stored:]
    for n, path in enumerate(rest, start=1):
        assert send_files(gw.port, [path], gw.ae_title) == [0x0000], f"file {n} of {len(rest)}"
        wait_until(lambda: orthanc.instance_count() == stored + n, 30, 0.05, "instance not delivered")
        wait_until(lambda: value(scrape(gw), "gateway_spool_used_bytes") <= 0.8 * MiB, 10, 0.05, "no room made")
    assert readyz(gw)[0] == 200
    assert gw.counts()["queued"] == 0
