"""The fault suite's summary table: each scenario records what it sent, what came back
and what it survived, and pytest prints the table at the end of the run, so a CI log
(``.ci/run``) carries the evidence an admin asks for (nothing lost, no crash).

The table lives in the run's config stash. In a parallel run each pytest-xdist worker
fills its own, hands its rows to the controller when it ends, and the controller, which
prints the summary, merges them (hooks in ``tests/conftest.py``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest

#: ``GATEWAY_FAULT_SCALE=full`` runs the scenarios at the size of the issue's field test
#: (20 associations x 100 instances, 3,000 fuzzed PDUs); unset: CI size.
FULL_SCALE = os.environ.get("GATEWAY_FAULT_SCALE", "").lower() == "full"


@dataclass
class FaultSummary:
    """Rows of the summary table, in the order the scenarios ran (worker by worker in a
    parallel run)."""

    delivery: list[dict[str, object]] = field(default_factory=list)
    fuzz: list[dict[str, object]] = field(default_factory=list)
    rejections: dict[str, int] = field(default_factory=dict)

    def reject(self, kind: str, count: int = 1) -> None:
        self.rejections[kind] = self.rejections.get(kind, 0) + count

    def rows(self) -> dict[str, Any]:
        """What a worker sends the controller (plain data: it crosses a process)."""
        return asdict(self)

    def merge(self, rows: dict[str, Any]) -> None:
        """Add a worker's rows to these."""
        self.delivery.extend(rows["delivery"])
        self.fuzz.extend(rows["fuzz"])
        for kind, count in rows["rejections"].items():
            self.reject(kind, count)

    def lines(self) -> list[str]:
        out: list[str] = []
        if self.delivery:
            out.append(f"{'scenario':<32}{'sent':>7}{'acked':>7}{'deliv':>7}{'lost':>6}{'dup':>6}{'left':>6}")
            for r in self.delivery:
                out.append(
                    f"{r['scenario']:<32}{r['sent']:>7}{r['acknowledged']:>7}{r['delivered']:>7}"
                    f"{r['lost']:>6}{r['duplicated']:>6}{r['left']:>6}"
                )
        if self.fuzz:
            out.append(f"{'fuzz target':<32}{'cases':>7}{'crash':>7}{'hangs':>7}{'RSS+MB':>8}")
            for r in self.fuzz:
                out.append(f"{r['target']:<32}{r['cases']:>7}{r['crashes']:>7}{r['hangs']:>7}{r['rss_growth_mb']:>8}")
        if self.rejections:
            out.append(f"{'rejection':<32}{'count':>7}")
            out.extend(f"{kind:<32}{n:>7}" for kind, n in self.rejections.items())
        return out


SUMMARY = pytest.StashKey[FaultSummary]()


def summary_of(config: pytest.Config) -> FaultSummary:
    """The run's table, made on first use."""
    return config.stash.setdefault(SUMMARY, FaultSummary())
