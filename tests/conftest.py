"""Shared fixtures: real Orthanc and dcmtk processes (tests.support.fixtures) and the
gateway daemon itself, each on free loopback ports and cleaned up after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Gateway

pytest_plugins = ["tests.support.fixtures"]


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    """Factory: ``gateway(upstream_url=..., spool={...}, dimse={...})`` starts a daemon."""
    started: list[Gateway] = []

    def make(**kwargs: Any) -> Gateway:
        gw = Gateway(tmp_path / f"gateway{len(started)}", **kwargs)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.kill()
