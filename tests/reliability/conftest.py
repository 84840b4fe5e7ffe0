"""The fault suite's summary table (tests.support.faultsummary), as a fixture the
scenarios append their rows to."""

from __future__ import annotations

import pytest

from tests.support.faultsummary import FaultSummary, summary_of


@pytest.fixture(scope="session")
def fault_summary(request: pytest.FixtureRequest) -> FaultSummary:
    """The session's table; scenarios append their rows."""
    return summary_of(request.config)
