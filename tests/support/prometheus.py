"""A real Prometheus server (Debian's /usr/bin/prometheus) scraping gateways every
second and evaluating alerting rules every second, on a free loopback port, with its
own throwaway data directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, wait_for_port
from tests.support.process import terminate

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")


class Prometheus:
    """One prometheus process scraping ``targets`` (``host:port``) as job
    ``dicom-gateway`` with ``rules`` loaded; ``stop()`` ends it."""

    def __init__(self, workdir: Path, targets: Sequence[str], rules: Path) -> None:
        if shutil.which(str(PROMETHEUS)) is None:
            raise AssertionError(f"{PROMETHEUS} missing: run scripts/install-test-deps.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.config_path.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {json.dumps(str(rules))}\n"
            "scrape_configs:\n  - job_name: dicom-gateway\n    static_configs:\n"
            f"      - targets: {json.dumps(list(targets))}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    str(PROMETHEUS), f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )
        try:
            wait_for_port("127.0.0.1", self.port, 20)
        except AssertionError:
            self.stop()
            raise AssertionError(f"prometheus did not start:\n{self.log_path.read_text()}") from None
        return self

    def stop(self) -> None:
        terminate(self.proc, 10)

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/{path}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> dict[str, list[dict[str, Any]]]:
        """Alert name -> its active alerts (pending or firing), each with labels and state."""
        active: dict[str, list[dict[str, Any]]] = {}
        for alert in self.api("alerts")["alerts"]:
            active.setdefault(alert["labels"]["alertname"], []).append(alert)
        return active
