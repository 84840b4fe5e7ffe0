"""C-MOVE/C-GET faults: an instance search that fails after sub-operations ran, and
transcoding a large multi-frame instance within bounded memory.

A search that breaks mid-way: Orthanc's DICOMweb behind `SearchFailingProxy`, which
answers the second QIDO-RS page of the instance search with 503 (``find.page_size``
is 5, so the first page lists 5 of the series' 12 instances); dcmtk's movescu, getscu
and storescp are the mover, the requester and the destination.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from tests.integration.test_move_retrieve import failed_list, parse_move, peers
from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP, getscu, movescu
from tests.support.orthanc import Orthanc
from tests.support.searchproxy import SearchFailingProxy
from tests.support.synth import ct_series

PAGE = 5  # find.page_size: the first page the search lists before failing
SERIES_SIZE = 12


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID) for p in paths}


def error_comment(output: str, final_marker: str) -> str:
    """Error Comment (0000,0902) of the final response, as dumped by dcmtk's ``-d``
    (in the Status Detail after the message)."""
    match = re.search(r"\(0000,0902\) LO \[([^\]]*)\]", output.rpartition(final_marker)[2])
    return match.group(1) if match else ""


@dataclass
class SearchEnv:
    orthanc: Orthanc
    proxy: SearchFailingProxy
    gateway: Gateway
    scp: StoreSCP
    refusing: StoreSCP
    series: list[Path]
    study_uid: str
    series_uid: str


def start_gateway(root: Path, proxy: SearchFailingProxy, scp: StoreSCP, refusing: StoreSCP) -> Gateway:
    return Gateway(
        root, upstream_url=proxy.url,
        extra=peers(("STORESCP", scp.port), ("REFUSER", refusing.port)) + f"\n[find]\npage_size = {PAGE}\n",
    ).start()


@pytest.fixture(scope="module")
def search_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SearchEnv]:
    root = tmp_path_factory.mktemp("search-fails")
    series = ct_series(root / "series", SERIES_SIZE, 32, 32)
    first = pydicom.dcmread(series[0], stop_before_pixels=True)
    scp = StoreSCP(output_dir=root / "dest").start()
    refusing = StoreSCP(output_dir=root / "refusing", ae_title="REFUSER", extra_args=["--refuse"]).start()
    orthanc = Orthanc(workdir=root / "orthanc")
    proxy: SearchFailingProxy | None = None
    gateway: Gateway | None = None
    try:
        orthanc.start()
        orthanc.upload(series)
        proxy = SearchFailingProxy(orthanc.dicomweb_url).start()
        gateway = start_gateway(root / "gw", proxy, scp, refusing)
        yield SearchEnv(orthanc, proxy, gateway, scp, refusing, series, str(first.StudyInstanceUID), str(first.SeriesInstanceUID))
    finally:
        if gateway is not None:
            gateway.kill()
        if proxy is not None:
            proxy.stop()
        scp.cleanup()
        refusing.cleanup()
        orthanc.cleanup()


def clear(scp: StoreSCP) -> None:
    for path in scp.files():
        path.unlink()


def test_move_search_failing_after_sending_began_ends_with_warning(search_env: SearchEnv) -> None:
    """The series is read whole (RetrieveSeries) while the search lists it; the search
    lists 5 and fails. The 5 listed arrive, and the final status is 0xB000 (Warning:
    sub-operations complete, one or more failures; PS3.4 C.4.2.1.5), not 0xA701 (which
    refuses before any sub-operation): Completed 5 as storescp received, nothing failed
    (every listed instance was sent), and the Error Comment says the search failed."""
    env = search_env
    clear(env.scp)
    failed_before = len(env.proxy.failed_searches)
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": env.study_uid, "SeriesInstanceUID": env.series_uid}
    result = parse_move(movescu(env.gateway.port, "DICOMGW", "STORESCP", keys, extra_args=["-v", "-d"], timeout=60))
    assert len(env.proxy.failed_searches) > failed_before, "the proxy never failed a search page"
    assert (result.status, result.completed, result.failed, result.warning) == (0xB000, PAGE, 0, 0), result.output[-3000:]
    received = uids(env.scp.wait_for_files(PAGE))
    assert len(received) == PAGE and received <= uids(env.series)
    assert failed_list(result) == set()
    assert error_comment(result.output, "Received Final Move Response").startswith("search failed"), result.output[-3000:]
    assert "search failed after listing 5 instances" in env.gateway.log()


def test_move_search_failing_with_a_failed_retrieval_lists_it(tmp_path: Path, search_env: SearchEnv) -> None:
    """SERIES level without the study: no bulk read, each listed instance is fetched
    alone, and the first of those fetches fails too. Final 0xB000 with Completed 4,
    Failed 1, and the failed instance's UID in FailedSOPInstanceUIDList."""
    env = search_env
    proxy = SearchFailingProxy(env.orthanc.dicomweb_url, fail_retrievals=1).start()
    scp = StoreSCP(output_dir=tmp_path / "dest").start()
    gateway = start_gateway(tmp_path / "gw", proxy, scp, env.refusing)
    try:
        keys = {"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": env.series_uid}
        result = parse_move(movescu(gateway.port, "DICOMGW", "STORESCP", keys, extra_args=["-v", "-d"], timeout=60))
        assert proxy.failed_searches and len(proxy.failed_retrievals) == 1
        assert (result.status, result.completed, result.failed, result.warning) == (0xB000, PAGE - 1, 1, 0), result.output[-3000:]
        assert failed_list(result) == set(proxy.failed_retrievals), result.output[-3000:]
        received = uids(scp.wait_for_files(PAGE - 1))
        assert len(received) == PAGE - 1 and not received & set(proxy.failed_retrievals)
    finally:
        gateway.kill()
        proxy.stop()
        scp.cleanup()


def test_move_search_failing_with_nothing_completed_ends_with_a702(search_env: SearchEnv) -> None:
    """The destination refuses the association: none of the 5 listed instances can be
    sent, so the final status is 0xA702 (Refused: out of resources, unable to perform
    sub-operations), Failed 5 and their UIDs listed, the Error Comment on the search."""
    env = search_env
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": env.study_uid, "SeriesInstanceUID": env.series_uid}
    result = parse_move(movescu(env.gateway.port, "DICOMGW", "REFUSER", keys, extra_args=["-v", "-d"], timeout=60))
    assert (result.status, result.completed, result.failed, result.warning) == (0xA702, 0, PAGE, 0), result.output[-3000:]
    listed = failed_list(result)
    assert len(listed) == PAGE and listed <= uids(env.series), result.output[-3000:]
    assert error_comment(result.output, "Received Final Move Response").startswith("search failed"), result.output[-3000:]
    assert env.refusing.files() == []


def test_get_search_failing_after_sending_began_ends_with_warning(tmp_path: Path, search_env: SearchEnv) -> None:
    """C-GET likewise: the 5 listed instances come back over the requester's own
    association and the final C-GET response is 0xB000 with Completed 5."""
    env = search_env
    out = tmp_path / "got"
    out.mkdir()
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": env.study_uid, "SeriesInstanceUID": env.series_uid}
    proc = getscu(env.gateway.port, "DICOMGW", keys, out, extra_args=["-v", "-d"], timeout=60)
    output = proc.stdout + proc.stderr
    final = output.rpartition("C-GET RSP")[2].split("END DIMSE MESSAGE")[0]  # the last response
    status = re.search(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", final)
    assert status is not None and int(status.group(1), 16) == 0xB000, output[-3000:]
    assert re.search(r"Completed Suboperations\s*:\s*5\b", final), output[-3000:]
    assert re.search(r"Failed Suboperations\s*:\s*(0|none)\b", final), output[-3000:]
    got = list(out.iterdir())
    assert len(got) == PAGE and uids(got) <= uids(env.series)
