"""pytest fixtures for real servers; enable with ``pytest_plugins = ["tests.support.fixtures"]``.

Each fixture stops its processes in teardown, which pytest runs even when the
test failed, so no Orthanc or storescp outlives its test. Working directories
live under pytest's ``tmp_path``: pytest keeps the last few runs, so after a
failure the Orthanc/storescp logs and received files can still be read.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP
from tests.support.orthanc import Orthanc
from tests.support.pki import Pki, make_pki


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A fresh, empty Orthanc for one test (about 0.1 s to start; killed at the end)."""
    server = Orthanc(workdir=tmp_path / "orthanc")
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """Factory starting ``StoreSCP(**kwargs)`` instances, all stopped at teardown.

    Each gets its own output directory under ``tmp_path`` unless
    ``output_dir`` is given; returns the started StoreSCP.
    """
    started: list[StoreSCP] = []

    def start(**kwargs: Any) -> StoreSCP:
        kwargs.setdefault("output_dir", tmp_path / f"storescp-{len(started)}")
        scp = StoreSCP(**kwargs)
        started.append(scp)
        return scp.start()

    try:
        yield start
    finally:
        for scp in started:
            scp.cleanup()


# Debian's chromium, installed by scripts/install-test-deps.sh; Playwright drives it (no browser download).
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium (Playwright's Browser), closed after the test."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """One throwaway PKI for every TLS test of the run (see tests.support.pki)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_gateway(tmp_path: Path, pki: Pki) -> Iterator[Callable[..., Gateway]]:
    """Factory: a gateway whose config names its certificate files relative to itself
    (they are copied beside the config file), with ``[dimse.tls]`` on ``tls_port``."""
    started: list[Gateway] = []

    def make(dimse_tls: str = "", http_tls: str = "", **kwargs: Any) -> Gateway:
        workdir = tmp_path / f"gw{len(started)}"
        workdir.mkdir()
        for name in ("server.crt", "server.key", "ca.crt"):
            shutil.copy(pki.directory / name, workdir / name)
        gw = Gateway(workdir, extra=dimse_tls + http_tls, **kwargs)
        started.append(gw)
        return gw.start()

    yield make
    for gw in started:
        gw.kill()


@contextmanager
def gateway_over(upstream: str, directory: Path, **options: Any) -> Iterator[tuple[Gateway, Orthanc | None]]:
    """A started gateway (``Gateway(**options)``) over the embedded archive
    (``upstream = "local"``) or over a fresh Orthanc's DICOMweb (``"orthanc"``), for
    tests run against both; both stopped on leaving."""
    orthanc = Orthanc(workdir=directory / "orthanc").start() if upstream == "orthanc" else None
    gw = Gateway(directory / "gw", upstream_url=orthanc.dicomweb_url if orthanc else None, **options)
    try:
        yield gw.start(), orthanc
    finally:
        gw.kill()
        if orthanc is not None:
            orthanc.cleanup()
