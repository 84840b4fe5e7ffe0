"""Load, two archive outages and a SIGKILL at once: every instance a modality saw
acknowledged reaches the archive, nothing stays in the spool, and the duplicates the
kill causes (a duplicate is allowed, a loss is not) are counted and reported.

Each modality is a thread running the real /usr/bin/storescu over its series in
chunks, and, like a real modality, sending again what was not acknowledged when an
association fails (the gateway is down for a moment after the kill). The SIGKILL
strikes in the middle of one long association (a burst of larger instances), so an
association in flight is cut. "Duplicated" counts deliveries the gateway logged beyond
one per instance (a delivery whose record the kill lost before its log line is not
seen); "sent" beyond "acknowledged" counts what the modalities had to send again.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.support.faultsummary import FULL_SCALE, FaultSummary
from tests.reliability.test_kill import acknowledged_files
from tests.support.dcmtk import dcmtk_env
from tests.support.ports import wait_until
from tests.support.synth import ct_series

MODALITIES, INSTANCES = (20, 100) if FULL_SCALE else (8, 25)
#: Instances of the one long association the SIGKILL cuts (it is resent, so some
#: instances reach the gateway twice: the duplicates the summary counts).
BURST = 200 if FULL_SCALE else 100
CHUNK = 5
PACE = 2.5


class Modality(threading.Thread):
    """Sends its files chunk by chunk until each was acknowledged once."""

    def __init__(
        self, name: str, files: list[Path], gateway_port: int, called_ae: str, pace: float, delay: float = 0.0,
        chunk: int = CHUNK,
    ) -> None:
        """``pace``: seconds between chunks; ``delay``: before the first (staggered
        modalities make the acknowledged count grow smoothly, not in steps);
        ``chunk``: instances per association."""
        super().__init__(name=name, daemon=True)
        self.files = files
        self.port = gateway_port
        self.called_ae = called_ae
        self.pace = pace
        self.delay = delay
        self.chunk = chunk
        self.sent = 0
        self.acked: set[str] = set()
        self.failures = 0

    def run(self) -> None:
        time.sleep(self.delay)
        deadline = time.monotonic() + 300
        for start in range(0, len(self.files), self.chunk):
            pending = [str(f) for f in self.files[start : start + self.chunk]]
            while pending and time.monotonic() < deadline:
                proc = subprocess.run(
                    ["/usr/bin/storescu", "-v", "-to", "10", "-ta", "10", "-td", "30",
                     "-aet", self.name, "-aec", self.called_ae, "127.0.0.1", str(self.port), *pending],
                    check=False, capture_output=True, text=True, env=dcmtk_env(), timeout=120,
                )
                self.sent += proc.stdout.count("Sending file:") + proc.stderr.count("Sending file:")
                done = set(acknowledged_files(proc.stdout + proc.stderr))
                self.acked |= done
                pending = [f for f in pending if f not in done]
                if pending:
                    self.failures += 1
                    time.sleep(0.5)
            time.sleep(self.pace)


def deliveries(log: str) -> int:
    """Instances the forwarders reported delivered, over every run of the daemon."""
    return sum(int(n) for n in re.findall(r"delivered (\d+) instance\(s\) of study", log))


@pytest.mark.slow
@pytest.mark.timeout(900 if FULL_SCALE else 300)
def test_load_with_two_outages_and_a_kill(tmp_path: Path, orthanc, gateway, fault_summary: FaultSummary) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    series = [ct_series(tmp_path / f"m{n}", INSTANCES, rows=32, columns=32) for n in range(MODALITIES)]
    uid_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for files in series for f in files}
    burst_files = ct_series(tmp_path / "burst", BURST, rows=256, columns=256)
    uid_of |= {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in burst_files}
    paced = MODALITIES * INSTANCES
    # About 15 s of sending at CI size, so both outages and the kill fall inside it.
    modalities = [
        Modality(f"MOD{n:02d}", files, gw.port, gw.ae_title, pace=PACE, delay=PACE * n / MODALITIES)
        for n, files in enumerate(series)
    ]
    for m in modalities:
        m.start()

    def acked() -> int:
        return sum(len(m.acked) for m in modalities)

    mid_send: list[bool] = []

    def after(fraction: float) -> None:
        """Wait for ``fraction`` of the instances to be acknowledged; note whether
        sending is still going on, as every fault here must strike during it."""
        wait_until(lambda: acked() >= fraction * paced or not any(m.is_alive() for m in modalities),
                   240, 0.05, f"sending stalled before {fraction:.0%}")
        mid_send.append(acked() < paced)

    after(0.1)
    orthanc.stop()
    after(0.25)
    orthanc.start()
    after(0.4)
    burst = Modality("BURST", burst_files, gw.port, gw.ae_title, pace=0, chunk=BURST)
    spooled = sum(gw.counts().values())
    burst.start()
    wait_until(lambda: "association accepted from BURST@" in gw.log() and sum(gw.counts().values()) >= spooled + 20,
               60, 0.005, "the long association never started")
    gw.proc.kill()  # SIGKILL in the middle of the long association: no shutdown code runs
    gw.proc.wait()
    time.sleep(1.0)  # modalities meet a closed port meanwhile, and retry
    gw.start()
    after(0.55)
    orthanc.stop()
    after(0.7)
    orthanc.start()
    everyone = [*modalities, burst]
    for m in everyone:
        m.join(timeout=300)
        assert not m.is_alive(), f"{m.name} never finished sending"

    acked_uids = {uid_of[f] for m in everyone for f in m.acked}
    assert len(acked_uids) == paced + BURST  # each modality kept sending until all were acknowledged

    def delivered_all() -> bool:
        return acked_uids <= orthanc.sop_instance_uids()

    try:
        wait_until(delivered_all, 240, 1.0, "acknowledged instances missing from Orthanc")
        gw.wait_counts(queued=0, sending=0, failed=0, dead=0, timeout=60)
    finally:
        in_orthanc = orthanc.sop_instance_uids()
        counts = gw.counts() if gw.running else {}
        fault_summary.delivery.append({
            "scenario": f"load {MODALITIES}x{INSTANCES}+{BURST}, 2 outages+kill",
            "sent": sum(m.sent for m in everyone),
            "acknowledged": len(acked_uids),
            "delivered": len(acked_uids & in_orthanc),
            "lost": len(acked_uids - in_orthanc),
            "duplicated": max(0, deliveries(gw.log()) - len(in_orthanc)),
            "left": sum(v for k, v in counts.items() if k != "delivered"),
        })
    assert not any((gw.spool_dir / "incoming").iterdir())
    assert burst.failures > 0, "the kill never interrupted the long association"
    assert all(mid_send), f"a fault came after sending ended: {mid_send}"
