"""HEAD on every GET route of the facade: the GET's status and headers, no body.

``curl -I`` against the daemon over the embedded archive, compared with the GET of the
same URL and Accept; then HEAD and GET alternating on one kept-alive connection, which
breaks if a HEAD answer ever puts body bytes on the wire.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pydicom
import pytest

from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.synth import ct_series

# Headers that legitimately differ between a GET and a HEAD, or between two answers.
VOLATILE = {"date", "transfer-encoding", "content-length", "server"}
JSON = "application/dicom+json"
XML = 'multipart/related; type="application/dicom+xml"'
ELE_FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"


def _comparable(headers: dict[str, str]) -> dict[str, str]:
    kept = {k: v for k, v in headers.items() if k not in VOLATILE}
    if "content-type" in kept:  # every multipart answer has a boundary of its own
        kept["content-type"] = re.sub(r"boundary=[^;]+", "boundary=*", kept["content-type"])
    return kept


@pytest.fixture
def loaded(tmp_path: Path, gateway: Callable[..., Gateway]) -> tuple[Gateway, list[Path]]:
    gw = gateway()
    paths = ct_series(tmp_path / "ct", 2, rows=64, columns=64, frames=3)
    for path in paths:
        r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom",
                 "--header", f"Accept: {JSON}", "--data-binary", f"@{path}")
        assert r.status == 200, r.body
    gw.wait_counts(delivered=2)
    return gw, paths


def _routes(gw: Gateway, path: Path) -> list[tuple[str, str]]:
    """(URL, Accept) of every GET resource, answers and refusals both."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    root = f"{gw.web_url}/dicom-web"
    study = f"{root}/studies/{ds.StudyInstanceUID}"
    series = f"{study}/series/{ds.SeriesInstanceUID}"
    instance = f"{series}/instances/{ds.SOPInstanceUID}"
    uri = f"studyUID={ds.StudyInstanceUID}&seriesUID={ds.SeriesInstanceUID}&objectUID={ds.SOPInstanceUID}"
    return [
        (f"{gw.web_url}/healthz", "*/*"),
        (f"{gw.web_url}/readyz", "*/*"),
        (f"{root}/studies?PatientID=SYNTH-001", JSON),
        (f"{root}/studies?PatientID=SYNTH-001", XML),
        (f"{root}/series", JSON),
        (f"{root}/instances?limit=1", JSON),
        (f"{study}/series", JSON),
        (f"{study}/instances", XML),
        (f"{series}/instances", JSON),
        (study, 'multipart/related; type="application/dicom"; transfer-syntax=*'),
        (series, 'multipart/related; type="application/dicom"'),
        (instance, "application/dicom; transfer-syntax=*"),
        (instance, 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'),
        (f"{study}/metadata", JSON),
        (f"{series}/metadata", XML),
        (f"{instance}/metadata", JSON),
        (f"{instance}/frames/2", ELE_FRAMES),
        (f"{instance}/frames/1,3", "multipart/related; type=application/octet-stream; transfer-syntax=*"),
        (f"{instance}/bulkdata/7FE00010", "*/*"),
        (f"{instance}/rendered", "image/png"),
        (f"{instance}/frames/2/rendered", "image/jpeg"),
        (f"{instance}/thumbnail", "image/png"),
        (f"{study}/rendered", "image/png"),
        (f"{series}/thumbnail", "image/jpeg"),
        (f"{gw.web_url}/wado?requestType=WADO&{uri}&contentType=application/dicom", "*/*"),
        (f"{gw.web_url}/wadouri/?requestType=WADO&{uri}&contentType=image/jpeg", "*/*"),
        (f"{gw.web_url}/v1/studies/{ds.StudyInstanceUID}/series", JSON),
        (f"{gw.web_url}/datastore/d9a2a515ab294163a2d2f4069eed584c/studies/{ds.StudyInstanceUID}/metadata", JSON),
        # refusals: the same status and headers too
        (f"{root}/studies/1.2.3.404", 'multipart/related; type="application/dicom"'),
        (f"{root}/studies/not-a-uid/metadata", JSON),
        (f"{instance}/frames/9", ELE_FRAMES),
        (f"{instance}/metadata", "text/html"),
    ]


@pytest.mark.slow
def test_head_answers_what_get_answers_without_the_body(loaded: tuple[Gateway, list[Path]]) -> None:
    gw, paths = loaded
    routes = _routes(gw, paths[0])
    statuses = set()
    for url, accept in routes:
        got = curl(url, "--header", f"Accept: {accept}")
        head = curl("-I", url, "--header", f"Accept: {accept}")
        assert head.status == got.status, (url, accept, head.status, got.status)
        assert _comparable(head.headers) == _comparable(got.headers), (url, accept)
        if "content-length" in got.headers:  # a body sent whole: HEAD announces its length
            assert head.headers.get("content-length") == got.headers["content-length"], (url, accept)
        statuses.add(got.status)
    assert statuses == {200, 400, 404, 406}
    # /metrics changes with every request: its status and type only
    assert curl("-I", f"{gw.web_url}/metrics").status == 200

    async def alternate() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            for url, accept in routes:
                async with session.head(url, headers={"Accept": accept}) as resp:
                    assert await resp.read() == b""
                    status = resp.status
                async with session.get(url, headers={"Accept": accept}) as resp:
                    await resp.read()
                    assert resp.status == status, url

    asyncio.run(alternate())
