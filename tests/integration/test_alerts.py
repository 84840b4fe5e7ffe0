"""The alerting rules shipped in config/prometheus-alerts.yml, checked by promtool and
evaluated by a real Prometheus scraping real gateways in trouble: each alert becomes
active for the trouble it names, and the quiet ones stay quiet."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support import dcmtk
from tests.support.ports import closed_port, wait_until
from tests.support.prometheus import PROMTOOL, Prometheus
from tests.support.synth import ct_series

RULES = Path(__file__).resolve().parents[2] / "config" / "prometheus-alerts.yml"


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS: 11 rules found" in result.stdout, result.stdout + result.stderr


def test_the_alerts_that_need_a_long_stall_fire_on_time_in_promtool() -> None:
    """A 15-minute stall, a refusing archive, dropped audit messages: promtool evaluates
    the rules over synthetic series (tests/integration/data/alerts_test.yml)."""
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"], cwd=Path(__file__).parent / "data",
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr


def test_each_trouble_raises_its_alert_in_a_real_prometheus(tmp_path: Path, gateway) -> None:
    # A gateway whose archive, route destination and audit repository are all down,
    # giving up at once (max_attempts = 1), and which rejects titles not its own.
    troubled = gateway(
        upstream_url=f"http://127.0.0.1:{closed_port()}/dicom-web",
        dimse={"check_called_ae": True},
        spool={"max_attempts": 1},
        extra=(
            f'\n[audit]\nsyslog = "tcp://127.0.0.1:{closed_port()}"\n'
            f'\n[[dimse.peers]]\nae_title = "AI"\nhost = "127.0.0.1"\nport = {closed_port()}\n'
            '\n[[dimse.routes]]\ndestination = "AI"\n'
        ),
    )
    assert dcmtk.storescu(troubled.port, ct_series(tmp_path / "ct", 1, 16, 16), troubled.ae_title, calling_ae="CT01").returncode == 0
    # A gateway whose spool floor sits just under the free space: near its limit, not yet refusing.
    free_mb = shutil.disk_usage(tmp_path).free // 2**20
    near = gateway(spool={"min_free_mb": int(free_mb / 1.05)})
    down = f"127.0.0.1:{closed_port()}"  # a gateway that is not running

    prometheus = Prometheus(tmp_path / "prometheus", [f"127.0.0.1:{troubled.http_port}", f"127.0.0.1:{near.http_port}", down], RULES)
    prometheus.start()
    try:
        # Rejected once Prometheus has seen the counter at 0, as a running one would have.
        target = f"127.0.0.1:{troubled.http_port}"
        wait_until(lambda: prometheus.api(f'query?query=up{{instance="{target}"}}==1')["result"], 60, 0.5, "never scraped")
        assert dcmtk.echoscu(troubled.port, "NOT_US", calling_ae="CT01").returncode != 0
        expected = {
            "DicomGatewayDeadInstances": "firing",
            "DicomGatewayRouteDeadCopies": "firing",
            "DicomGatewayAuditTrailFailing": "firing",
            "DicomGatewayAssociationsRejected": "firing",
            "DicomGatewaySpoolNearLimit": "pending",  # for: 5m
            "DicomGatewayDown": "pending",  # for: 2m
        }

        def active() -> dict[str, list[dict]] | None:
            alerts = prometheus.alerts()
            states = {name: {a["state"] for a in found} for name, found in alerts.items()}
            return alerts if all(state in states.get(name, set()) for name, state in expected.items()) else None

        try:
            alerts = wait_until(active, 60, 1.0, "not every alert became active")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {sorted((n, a[0]['state']) for n, a in prometheus.alerts().items())}") from None
        assert set(alerts) == set(expected), "an alert fired for trouble nobody made"
        (rejected,) = alerts["DicomGatewayAssociationsRejected"]
        assert rejected["labels"]["reason"] == "unknown_called_ae"
        (route,) = alerts["DicomGatewayRouteDeadCopies"]
        assert route["labels"]["destination"] == "AI"
        (limit,) = alerts["DicomGatewaySpoolNearLimit"]
        assert limit["labels"]["limit"] == "floor" and limit["labels"]["instance"] == f"127.0.0.1:{near.http_port}"
        (gone,) = alerts["DicomGatewayDown"]
        assert gone["labels"]["instance"] == down
        assert "will not reach the archive" in alerts["DicomGatewayDeadInstances"][0]["annotations"]["summary"]
    finally:
        prometheus.stop()
