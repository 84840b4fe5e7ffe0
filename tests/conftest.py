"""Shared fixtures: real Orthanc and dcmtk processes (tests.support.fixtures) and the
gateway daemon itself, each on free loopback ports and cleaned up after the test; and
the hooks that print the fault suite's table (tests.support.faultsummary), here because
a parallel run's controller loads no conftest below this one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Gateway
from tests.support.faultsummary import FULL_SCALE, SUMMARY, summary_of

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


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pytest-xdist worker hands its rows of the fault table to the controller."""
    handed = getattr(session.config, "workeroutput", None)
    summary = session.config.stash.get(SUMMARY, None)
    if handed is not None and summary is not None:
        handed["fault_summary"] = summary.rows()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The controller merges a finished worker's rows (pytest-xdist's hook)."""
    rows = getattr(node, "workeroutput", {}).get("fault_summary")
    if rows:
        summary_of(node.config).merge(rows)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    summary = config.stash.get(SUMMARY, None)
    lines = summary.lines() if summary is not None else []
    if lines:
        terminalreporter.section(f"fault suite summary ({'full' if FULL_SCALE else 'CI'} scale)")
        for line in lines:
            terminalreporter.write_line(line)
