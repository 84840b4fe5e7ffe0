"""An archive whose answer never ends (or inflates to far more than was sent) is
refused once the answer passes ``upstream.max_answer_mb``, not read until the daemon
runs out of memory; one nested deeper than JSON can be parsed is the archive's invalid
answer, not the gateway's internal error.

Measured before the bound: one C-FIND against an archive sending an endless JSON
array took the daemon to 9 GB in the 30 s before its timeout ended the search.
Each test checks what the client got, the admin's log line, and the daemon's peak
resident memory (VmHWM), which before the bound grew by hundreds of MB a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.floodarchive import FloodArchive
from tests.support.ports import wait_until
from tests.support.synth import ct_series

STUDY, SERIES, INSTANCE = "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6"
PEAK_MIB = 250  # the daemon peaks near 100 MiB; the bound below is 8 MiB


@pytest.fixture
def flooded(tmp_path: Path) -> Iterator[Callable[[str], tuple[Gateway, FloodArchive]]]:
    made: list[tuple[Gateway, FloodArchive]] = []

    def make(mode: str) -> tuple[Gateway, FloodArchive]:
        archive = FloodArchive(mode).start()
        gw = Gateway(
            tmp_path / mode,
            upstream=f'type = "dicomweb"\nurl = "{archive.url}"\ntimeout = 5\nmax_answer_mb = 8\n',
        ).start()
        made.append((gw, archive))
        return gw, archive

    yield make
    for gw, archive in made:
        gw.kill()
        archive.stop()


def peak_mib(gw: Gateway) -> int:
    assert gw.proc is not None
    with open(f"/proc/{gw.proc.pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) // 1024


def facade(gw: Gateway, path: str, accept: str = "application/dicom+json") -> tuple[int, str, float]:
    started = time.monotonic()
    got = curl("-H", f"Accept: {accept}", f"http://127.0.0.1:{gw.http_port}/dicom-web/{path}", timeout=30)
    return got.status, got.body.decode(errors="replace"), time.monotonic() - started


def test_an_endless_search_answer_ends_the_c_find_and_the_qido_request(
    flooded: Callable[[str], tuple[Gateway, FloodArchive]],
) -> None:
    gw, archive = flooded("endless-json")
    found = dcmtk.findscu(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, extra_args=["-v"])
    assert "Received Final Find Response (Failed: UnableToProcess)" in found.stderr
    assert "the search answer is larger than 8 MiB (upstream.max_answer_mb)" in gw.log()

    status, body, seconds = facade(gw, "studies")
    assert status == 502 and "larger than 8 MiB" in body
    assert seconds < 4  # refused at the bound, not at the 5 s timeout
    assert "WARNING gateway.web: QIDO-RS" in gw.log()
    assert peak_mib(gw) < PEAK_MIB
    assert archive.sent > 8 << 20


def test_an_endless_metadata_answer_is_a_502(flooded: Callable[[str], tuple[Gateway, FloodArchive]]) -> None:
    gw, _ = flooded("endless-json")
    status, body, seconds = facade(gw, f"studies/{STUDY}/series/{SERIES}/metadata")
    assert status == 502 and "the metadata answer is larger than 8 MiB" in body
    assert seconds < 4
    assert "the metadata answer is larger than 8 MiB (upstream.max_answer_mb)" in gw.log()
    assert peak_mib(gw) < PEAK_MIB


def test_a_gzip_answer_is_bounded_by_what_it_inflates_to(flooded: Callable[[str], tuple[Gateway, FloodArchive]]) -> None:
    """64 KiB on the wire, 64 MiB inflated: its Content-Length says nothing of the size."""
    gw, archive = flooded("gzip-bomb")
    status, body, _ = facade(gw, f"studies/{STUDY}/metadata")
    assert status == 502 and "the metadata answer is larger than 8 MiB" in body
    assert archive.sent < 1 << 20


def test_an_endless_frame_is_refused(flooded: Callable[[str], tuple[Gateway, FloodArchive]]) -> None:
    gw, _ = flooded("endless-frame")
    status, body, seconds = facade(
        gw, f"studies/{STUDY}/series/{SERIES}/instances/{INSTANCE}/frames/1",
        'multipart/related; type="application/octet-stream"; transfer-syntax=*',
    )
    assert status == 502 and "longer than 8 MiB" in body
    assert seconds < 4
    assert peak_mib(gw) < PEAK_MIB


def test_an_endless_error_page_is_cut_to_its_excerpt(flooded: Callable[[str], tuple[Gateway, FloodArchive]]) -> None:
    """An archive's 500 is a 503 to the viewer at once, whatever the length of its page."""
    gw, archive = flooded("endless-error")
    status, _, seconds = facade(gw, "studies")
    assert status == 503
    assert seconds < 4
    assert peak_mib(gw) < PEAK_MIB


def test_an_endless_stow_answer_sends_the_batch_again(flooded: Callable[[str], tuple[Gateway, FloodArchive]], tmp_path: Path) -> None:
    """The forwarder reads a STOW-RS answer to the bound too; one that passes it is a
    failed attempt (the instances go again), not a crash of the forwarder."""
    gw, _ = flooded("endless-json")
    [instance] = ct_series(tmp_path / "ct", 1, rows=64, columns=64)
    assert dcmtk.storescu(gw.port, [instance], gw.ae_title).returncode == 0
    wait_until(lambda: "the STOW-RS answer is larger than 8 MiB (upstream.max_answer_mb)" in gw.log(), 30, 0.2, "no failed attempt logged")
    assert peak_mib(gw) < PEAK_MIB
    assert gw.running and "Traceback" not in gw.log()


def test_json_nested_past_the_parser_is_the_archives_fault(flooded: Callable[[str], tuple[Gateway, FloodArchive]]) -> None:
    """400 KB of arrays nested 200,000 deep: Python's JSON parser gives up with a
    RecursionError, which was the gateway's "internal error" (an ERROR line, 0xC000
    "internal error (RecursionError)"); it is the archive's invalid answer."""
    gw, _ = flooded("deep-json")
    found = dcmtk.findscu(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, extra_args=["-v"])
    assert "Received Final Find Response (Failed: UnableToProcess)" in found.stderr
    assert "archive answered a search with invalid JSON" in gw.log()
    status, body, _ = facade(gw, f"studies/{STUDY}/metadata")
    assert status == 502 and "archive answered metadata with invalid JSON" in body
    assert "internal error" not in gw.log() and " ERROR " not in gw.log()
