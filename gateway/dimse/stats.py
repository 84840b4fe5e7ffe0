"""Per-association counters, so each association ends with one summary log line."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AssociationStats:
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    echoed: int = 0


def stats_for(assoc: Any) -> AssociationStats:
    """The counters attached to a pynetdicom Association (created on first use)."""
    stats = getattr(assoc, "gateway_stats", None)
    if stats is None:
        stats = AssociationStats()
        assoc.gateway_stats = stats
    return stats
