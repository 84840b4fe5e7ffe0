"""Session fixtures of the C-FIND suites: one synthetic archive loaded into an Orthanc
(the oracle, and the upstream of a DICOMweb gateway) and into an embedded-archive
gateway, built once because loading 300+ studies three ways is the slow part."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon import Gateway
from tests.support.dcmtk import storescu
from tests.support.finddata import Archive, build_archive
from tests.support.orthanc import Orthanc

# Orthanc's default (Latin-1) loses non-Latin-1 names when it indexes them.
ORTHANC_FIND_CONFIG = {"DefaultEncoding": "Utf8"}


@pytest.fixture(scope="session")
def find_archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    return build_archive(tmp_path_factory.mktemp("find-archive"))


@pytest.fixture(scope="session")
def find_orthanc(tmp_path_factory: pytest.TempPathFactory, find_archive: Archive) -> Iterator[Orthanc]:
    server = Orthanc(workdir=tmp_path_factory.mktemp("find-orthanc"), extra_config=ORTHANC_FIND_CONFIG)
    try:
        server.start()
        server.upload([find_archive.directory])
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def find_gateway(tmp_path_factory: pytest.TempPathFactory, find_orthanc: Orthanc) -> Iterator[Gateway]:
    """A gateway whose upstream is the oracle Orthanc's DICOMweb, paging by 100."""
    gw = Gateway(
        tmp_path_factory.mktemp("find-gw"),
        upstream_url=find_orthanc.dicomweb_url,
        extra="\n[find]\npage_size = 100\n",
    )
    try:
        yield gw.start()
    finally:
        gw.kill()


@pytest.fixture(scope="session")
def find_local(tmp_path_factory: pytest.TempPathFactory, find_archive: Archive) -> Iterator[Gateway]:
    """A gateway on its embedded archive, loaded with the same files over C-STORE."""
    gw = Gateway(tmp_path_factory.mktemp("find-local"), extra="\n[find]\npage_size = 64\n")
    try:
        gw.start()
        result = storescu(gw.port, [find_archive.directory], gw.ae_title, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
        gw.wait_counts(timeout=180, delivered=len(find_archive.files))
        yield gw
    finally:
        gw.kill()
