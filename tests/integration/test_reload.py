"""SIGHUP on a real daemon (what systemd's ExecReload sends): peers, allow-lists,
association limits and the log level change at once, an association open across the
reload carries on, keys bound at start are reported as needing a restart, and a broken
file changes nothing."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.daemon import Gateway
from tests.support.dcmtk import echoscu, storescu
from tests.support.ports import wait_until
from tests.support.pyscu import echo
from tests.support.synth import ct_series

PEERS = '\n[[dimse.peers]]\nae_title = "PYSCU"\nhost = "127.0.0.1"\nport = 104\n' \
        '\n[[dimse.peers]]\nae_title = "ECHOSCU"\nhost = "127.0.0.1"\nport = 104\n'
NEWCOMER = '\n[[dimse.peers]]\nae_title = "NEWCOMER"\nhost = "127.0.0.1"\nport = 104\n'


def sighup(gw: Gateway, reloads_before: int) -> str:
    """Send SIGHUP and return the log line of the reload (or its refusal)."""
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGHUP)

    def line() -> str | None:
        hits = [x for x in gw.log().splitlines() if "configuration reloaded" in x or "reload refused" in x]
        return hits[-1] if len(hits) > reloads_before else None

    wait_until(line, 10, 0.05, "no reload logged")
    return line() or ""


def test_sighup_reloads_peers_limits_and_level_without_dropping_associations(
    tmp_path: Path, gateway: Callable[..., Gateway]
) -> None:
    gw = gateway(dimse={"require_known_peers": True, "max_associations": 8}, extra=PEERS)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
    assert held.is_established
    try:
        assert echoscu(gw.port, gw.ae_title, calling_ae="NEWCOMER").returncode != 0

        text = gw.config_path.read_text()
        gw.config_path.write_text(
            text.replace('level = "INFO"', 'level = "DEBUG"').replace("max_associations = 8", "max_associations = 2")
            .replace(f"port = {gw.port}\n", f"port = {gw.port + 1}\n", 1)
            + NEWCOMER
        )
        line = sighup(gw, 0)
        assert "dimse.max_associations" in line and "dimse.peers" in line and "logging.level" in line, line
        assert "a restart is needed for dimse.port" in line, line

        # The association opened before the reload still works.
        assert echo(held) == 0x0000
        assert echoscu(gw.port, gw.ae_title, calling_ae="NEWCOMER").returncode == 0
        # max_associations = 2: the held one plus one more.
        files = ct_series(tmp_path / "ct", 1, rows=16, columns=16)
        assert storescu(gw.port, files, gw.ae_title, calling_ae="ECHOSCU").returncode == 0
        assert "spooled " in gw.log()  # a DEBUG line, now let through

        # A broken file is refused whole: the running configuration stays.
        gw.config_path.write_text("[dimse\n")
        assert "reload refused" in sighup(gw, 1)
        assert gw.running
        assert echo(held) == 0x0000
        assert echoscu(gw.port, gw.ae_title, calling_ae="NEWCOMER").returncode == 0

        gw.config_path.write_text(text.replace("max_associations = 8", "max_associations = 1"))
        assert "dimse.max_associations" in sighup(gw, 2)
        assert echoscu(gw.port, gw.ae_title, calling_ae="ECHOSCU").returncode != 0
        assert "too many associations" in gw.log()
        assert echo(held) == 0x0000
    finally:
        held.release()
    wait_until(lambda: echoscu(gw.port, gw.ae_title, calling_ae="ECHOSCU").returncode == 0, 10, 0.2,
               "a freed slot was never usable")
