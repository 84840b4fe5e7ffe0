"""Two gateway nodes behind HAProxy (TCP mode), each on its own spool, one archive: a
node SIGKILLed while four modalities send through the proxy loses nothing once it
restarts on its spool, and C-FIND and C-MOVE keep working through the survivor
meanwhile. This is the README's two-node deployment, run for real."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.integration.test_move_retrieve import parse_move, peers
from tests.support.faultsummary import FULL_SCALE, FaultSummary
from tests.reliability.test_fault_load import Modality, deliveries
from tests.support import dcmtk
from tests.support.daemon import Gateway
from tests.support.haproxy import HAProxy
from tests.support.ports import wait_until
from tests.support.synth import ct_series

MODALITIES = 4
INSTANCES = 125 if FULL_SCALE else 25


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[list[HAProxy]]:
    started: list[HAProxy] = []
    yield started
    for proxy in started:
        proxy.stop()


@pytest.mark.slow
@pytest.mark.timeout(600 if FULL_SCALE else 240)
def test_node_killed_behind_haproxy(
    tmp_path: Path, orthanc, gateway, storescp, haproxy: list[HAProxy], fault_summary: FaultSummary
) -> None:
    dest = storescp(ae_title="STORESCP")
    nodes = [gateway(upstream_url=orthanc.dicomweb_url, extra=peers(("STORESCP", dest.port))) for _ in range(2)]
    proxy = HAProxy(tmp_path / "haproxy", [n.port for n in nodes]).start()
    haproxy.append(proxy)
    # Three modalities send small instances in paced chunks; the fourth sends larger
    # ones in one long association, started mid-way, whose node is the one killed.
    series = [ct_series(tmp_path / f"m{n}", INSTANCES, rows=32, columns=32) for n in range(MODALITIES - 1)]
    series.append(ct_series(tmp_path / "long", INSTANCES, rows=512, columns=512))
    uid_of = {str(f): str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for files in series for f in files}
    total = MODALITIES * INSTANCES
    modalities = [
        Modality(f"MODALITY{n}", files, proxy.port, "DICOMGW", pace=1.0, delay=n / MODALITIES)
        for n, files in enumerate(series[:-1])
    ]
    for m in modalities:
        m.start()

    def acked() -> int:
        return sum(len(m.acked) for m in modalities)

    wait_until(lambda: acked() >= 0.4 * INSTANCES * (MODALITIES - 1), 120, 0.05, "sending through HAProxy stalled")
    long = Modality(f"MODALITY{MODALITIES - 1}", series[-1], proxy.port, "DICOMGW", pace=0, chunk=INSTANCES)
    modalities.append(long)
    long.start()
    holder: list[Gateway] = []

    def long_association_under_way() -> bool:
        holder[:] = [n for n in nodes if f"association accepted from {long.name}@" in n.log()]
        return bool(holder) and sum(holder[0].counts().values()) >= 5

    wait_until(long_association_under_way, 60, 0.005, "the long association never started")
    victim = holder[0]
    survivor = next(n for n in nodes if n is not victim)
    assert acked() < total, "sending ended before the kill"
    victim.proc.kill()  # SIGKILL in the middle of the long association
    victim.proc.wait()
    for m in modalities:
        m.join(timeout=180)
        assert not m.is_alive(), f"{m.name} never finished sending through the survivor"
    acked_uids = {uid_of[f] for m in modalities for f in m.acked}
    assert len(acked_uids) == total
    assert long.failures > 0, "the kill never cut the long association"

    # The survivor answers queries and moves through the proxy while the victim is down.
    survivor.wait_counts(queued=0, sending=0, failed=0, dead=0, timeout=120)
    study = str(dcmread(series[0][0], stop_before_pixels=True).StudyInstanceUID)
    in_archive = {uid_of[str(f)] for f in series[0]} & orthanc.sop_instance_uids()
    assert in_archive, "nothing of the first study reached the archive through the survivor"
    for attempt in range(3):
        (tmp_path / f"find{attempt}").mkdir()
        found = dcmtk.findscu(proxy.port, "DICOMGW", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study},
                              output_dir=tmp_path / f"find{attempt}")
        assert found.returncode == 0, found.stdout + found.stderr
        assert len(list((tmp_path / f"find{attempt}").glob("rsp*.dcm"))) == 1
    moved = parse_move(dcmtk.movescu(proxy.port, "DICOMGW", "STORESCP",
                                     {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, extra_args=["-v", "-d"]))
    assert (moved.status, moved.completed, moved.failed) == (0x0000, len(in_archive), 0), moved.output[-3000:]
    dest.wait_for_files(len(in_archive))

    victim.start()  # the same spool: what it acknowledged before the kill goes out now
    try:
        wait_until(lambda: acked_uids <= orthanc.sop_instance_uids(), 180, 1.0, "acknowledged instances missing")
        for node in nodes:
            node.wait_counts(queued=0, sending=0, failed=0, dead=0, timeout=60)
    finally:
        in_orthanc = orthanc.sop_instance_uids()
        fault_summary.delivery.append({
            "scenario": f"2 nodes {MODALITIES}x{INSTANCES}, node kill",
            "sent": sum(m.sent for m in modalities),
            "acknowledged": len(acked_uids),
            "delivered": len(acked_uids & in_orthanc),
            "lost": len(acked_uids - in_orthanc),
            "duplicated": max(0, sum(deliveries(n.log()) for n in nodes) - len(in_orthanc)),
            "left": sum(v for n in nodes if n.running for k, v in n.counts().items() if k != "delivered"),
        })
    first_run = victim.log().split("listening:")[1]
    assert re.search(r"released: [1-9]\d* stored", first_run), "the victim received nothing before its kill"
