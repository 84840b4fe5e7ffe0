"""The per-sender metrics keep their label set bounded whatever AE titles arrive."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.metrics import OTHER_SENDERS, REJECTION_REASONS, SENDER_LABELS, Metrics


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_each_sender_counted_under_its_own_title_until_the_bound_then_as_other() -> None:
    m = Metrics()
    m.store_answered("CT01", True)
    m.store_answered("CT01", False)
    for n in range(SENDER_LABELS + 10):
        m.store_answered(f"SCAN{n}", True)
    m.store_answered("CT01", True)  # labelled before the bound: keeps its own label
    assert sample(m, "gateway_dimse_instances_received_total", calling_ae="CT01", result="stored") == 2
    assert sample(m, "gateway_dimse_instances_received_total", calling_ae="CT01", result="refused") == 1
    assert sample(m, "gateway_dimse_instances_received_total", calling_ae=OTHER_SENDERS, result="stored") == 11
    assert sample(m, "gateway_dimse_instances_received_total", calling_ae="SCAN70", result="stored") is None
    titles = {
        s.labels["calling_ae"]
        for family in m.registry.collect()
        if family.name == "gateway_dimse_instances_received"
        for s in family.samples
    }
    assert len(titles) == SENDER_LABELS + 1  # 64 titles and "other"
    assert sample(m, "gateway_dimse_last_stored_timestamp_seconds", calling_ae="CT01") > 1.7e9


def test_every_rejection_reason_the_server_uses_exists_from_the_start_at_zero() -> None:
    """A series born at 1 shows Prometheus no increase: the alert on rejections would
    miss the first one of a kind."""
    m = Metrics()
    for reason in REJECTION_REASONS:
        assert sample(m, "gateway_dimse_associations_rejected_total", reason=reason) == 0
    source = (Path(__file__).resolve().parents[1] / "gateway" / "dimse" / "server.py").read_text()
    used = set(re.findall(r'"((?:unknown|wrong|too_many|application|pdu|tls)_[a-z_]+)"', source))
    assert used == set(REJECTION_REASONS)
