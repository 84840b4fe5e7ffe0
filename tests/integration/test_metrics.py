"""GET /metrics on a real daemon in front of Orthanc: each DIMSE operation done with
dcmtk moves the counters and histograms an admin would graph, by the right amounts and
with the right labels."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP, echoscu, findscu, getscu, movescu, storescu
from tests.support.orthanc import Orthanc
from tests.support.ports import wait_until
from tests.support.synth import ct_series

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gw: Gateway) -> Samples:
    """Every sample of /metrics, by name and label set (parsed, not grepped)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def peers(*entries: tuple[str, int]) -> str:
    return "".join(f'\n[[dimse.peers]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\n' for ae, port in entries)


def test_metrics_follow_dimse_operations_delivery_and_retrieval(
    tmp_path: Path, orthanc: Orthanc, gateway: Callable[..., Gateway]
) -> None:
    files = ct_series(tmp_path / "ct", 3, rows=32, columns=32)
    with StoreSCP(tmp_path / "received", ae_title="DEST", implicit_only=True) as dest:
        known = peers(("ECHOSCU", 104), ("STORESCU", 104), ("FINDSCU", 104), ("MOVESCU", 104), ("GETSCU", 104),
                      ("DEST", dest.port))
        gw = gateway(upstream_url=orthanc.dicomweb_url, dimse={"require_known_peers": True}, extra=known)
        before = scrape(gw)
        assert value(before, "gateway_dimse_associations_total") == 0
        assert value(before, "gateway_spool_instances", state="queued") == 0

        assert echoscu(gw.port, gw.ae_title).returncode == 0
        assert echoscu(gw.port, gw.ae_title, calling_ae="STRANGER").returncode != 0
        sending = time.time()
        result = storescu(gw.port, files, gw.ae_title)
        assert result.returncode == 0, result.stderr
        gw.wait_counts(delivered=3)
        result = findscu(gw.port, gw.ae_title, ["0008,0052=STUDY", "StudyInstanceUID"])
        assert result.returncode == 0, result.stderr
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        result = movescu(gw.port, gw.ae_title, "DEST", ["0008,0052=STUDY", f"StudyInstanceUID={study_uid}"])
        assert result.returncode == 0, result.stderr
        dest.wait_for_files(3)
        got = scrape(gw)
        (tmp_path / "got").mkdir()
        result = getscu(gw.port, gw.ae_title, ["0008,0052=STUDY", f"StudyInstanceUID={study_uid}"], tmp_path / "got")
        assert result.returncode == 0, result.stderr
        wait_until(lambda: value(scrape(gw), "gateway_dimse_associations_open") == 0, 10, 0.1, "associations still open")
        after = scrape(gw)

    histogram = "gateway_dimse_request_duration_seconds_count"
    assert value(after, histogram, command="C-ECHO", status="0x0000") == 1
    assert value(after, histogram, command="C-STORE", status="0x0000") == 3
    assert value(after, histogram, command="C-STORE") == 3
    assert value(after, "gateway_dimse_instances_received_total", calling_ae="STORESCU", result="stored") == 3
    assert value(after, "gateway_dimse_instances_received_total", result="refused") == 0
    assert sending <= value(after, "gateway_dimse_last_stored_timestamp_seconds", calling_ae="STORESCU") <= time.time()
    assert value(after, histogram, command="C-FIND", status="0x0000") == 1
    assert value(after, histogram, command="C-MOVE", status="0x0000") == 1
    assert value(after, histogram, command="C-GET", status="0x0000") == 1
    assert value(after, "gateway_dimse_request_duration_seconds_sum", command="C-MOVE") > 0
    # echo, store, find, move, get accepted; the stranger rejected in words.
    assert value(after, "gateway_dimse_associations_total") == 5
    assert value(after, "gateway_dimse_associations_rejected_total", reason="unknown_calling_ae") == 1
    assert value(after, "gateway_dimse_associations_open") == 0

    assert value(after, "gateway_delivery_attempts_total", upstream="dicomweb") == 3
    assert value(after, "gateway_delivery_outcomes_total", upstream="dicomweb", kind="delivered", state="delivered") == 3
    upstream = "gateway_upstream_request_duration_seconds_count"
    assert value(after, upstream, what="store", method="POST", status="200") >= 1
    assert value(after, upstream, what="search", method="GET", status="200") >= 1
    assert value(after, upstream, what="retrieve", method="GET", status="200") >= 1

    # The move's receiver takes only Implicit VR: each instance was converted once.
    assert value(got, "gateway_transcodes_total", source=EXPLICIT_LE, target=IMPLICIT_LE) == 3
    assert value(after, "gateway_spool_instances", state="delivered") == 3
    assert value(after, "gateway_spool_bytes", state="delivered") > 3 * 32 * 32 * 2
    assert value(after, "gateway_spool_oldest_pending_age_seconds") == 0
    assert value(after, "gateway_spool_free_bytes") > 0


def test_http_requests_are_counted_by_route_pattern(gateway: Callable[..., Gateway]) -> None:
    """A facade search, a lookup of a study that does not exist and the probes, each
    under its route pattern (never a UID as a label), with its status."""
    gw = gateway()
    base = f"http://127.0.0.1:{gw.http_port}"
    with urllib.request.urlopen(f"{base}/dicom-web/studies", timeout=10) as resp:
        assert resp.status in (200, 204)
        searched = resp.status
    try:
        urllib.request.urlopen(f"{base}/dicom-web/studies/1.2.3/metadata", timeout=10)
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    urllib.request.urlopen(f"{base}/healthz", timeout=10).read()
    samples = scrape(gw)
    count = "gateway_http_request_duration_seconds_count"
    assert value(samples, count, route="/dicom-web/studies", method="GET", status=str(searched)) == 1
    assert value(samples, count, route="/dicom-web/studies/{study}/metadata", status="404") == 1
    assert value(samples, count, route="/healthz", status="200") == 1
    assert not any("1.2.3" in dict(labels).get("route", "") for (_, labels) in samples)
