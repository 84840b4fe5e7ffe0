"""Association limits per peer, and idle associations that must not hold a slot: a
raw socket holds an association, dcmtk's echoscu asks for another."""

from __future__ import annotations

import time
import urllib.request
from base64 import b64encode

from tests.support import dcmtk
from tests.support.rawdimse import hold, read_pdu_header


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
    with hold(gw.port, gw.ae_title, "MODALITY"):
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
    with hold(gw.port, gw.ae_title, "SILENT") as holder:
        assert dcmtk.echoscu(gw.port, gw.ae_title).returncode != 0  # the one slot is taken
        holder.settimeout(10)
        started = time.monotonic()
        assert read_pdu_header(holder)[0] == 0x07  # A-ABORT, after network_timeout
        assert 0.5 < time.monotonic() - started < 5
        echo = dcmtk.echoscu(gw.port, gw.ae_title)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    assert "association from SILENT@127.0.0.1" in gw.log() and "aborted (network timeout)" in gw.log()
