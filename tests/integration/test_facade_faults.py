"""The facade over archives that misbehave (a scripted QIDO-RS server, since Orthanc
cannot be told to) and over a spool that cannot take more.

* an archive that ignores the match parameters: the gateway's own re-check answers
  exactly the matches, and ``offset``/``limit`` count those;
* an archive that cuts its answer: the answer says so with a PS3.18 Warning;
* an archive answering 503 or refusing the gateway's credentials: 503 and 502, named;
* a full spool: STOW-RS answers 503 with Retry-After and keeps nothing;
* a STOW-RS body cut off: no file left behind, the complete parts before it stored;
* a STOW-RS body that stalls (the client sends nothing more, or a malformed chunk
  after which aiohttp delivers nothing more): 408 after ``http.idle_timeout`` and the
  connection closed, the complete parts before it stored;
* a connection that sends nothing, or trickles a request's headers: closed after
  ``http.idle_timeout``;
* a client closing its connection in the middle of an answer (a viewer cancelling
  what it no longer needs): one INFO line and 499 in the metrics, no ERROR;
* requests aiohttp cannot parse: 400, one WARNING line each, no traceback, and none of
  the bytes they carried (a patient name in a query string too long to parse);
* a frame whose codestream header claims an image far larger than the instance's:
  406 at once, nothing decoded.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import urllib.request
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.data import get_testdata_file

from tests.support.curl import curl
from tests.support.dcmtk import storescu
from tests.support.fakeqido import FakeQido
from tests.support.orthanc import build_multipart_related
from tests.support.ports import wait_until
from tests.support.synth import ct_series


@pytest.fixture
def fake() -> Iterator[FakeQido]:
    server = FakeQido(count=20).start()
    try:
        yield server
    finally:
        server.stop()


def _uids(answer: list[dict]) -> list[str]:
    return [a["0020000D"]["Value"][0] for a in answer]


def test_every_archive_answer_is_rechecked_and_paged_by_the_gateway(gateway, fake: FakeQido) -> None:  # type: ignore[no-untyped-def]
    gw = gateway(upstream_url=fake.url)
    url = f"{gw.web_url}/dicom-web/studies"
    r = curl(f"{url}?StudyInstanceUID={fake.study(3)['0020000D']['Value'][0]}")  # type: ignore[index]
    assert r.status == 200 and _uids(r.json()) == ["1.2.826.0.1.3680043.10.1137.99.3"]
    assert any("0020000D=1.2.826.0.1.3680043.10.1137.99.3" in p for p in fake.requests)  # the key went upstream too
    r = curl(f"{url}?PatientName=NOT*")
    assert r.json() == []
    r = curl(f"{url}?PatientID=FAKE&offset=2&limit=5")
    assert _uids(r.json()) == [f"1.2.826.0.1.3680043.10.1137.99.{n}" for n in range(2, 7)]
    assert "warning" not in r.headers


def test_a_cut_answer_says_so(gateway) -> None:  # type: ignore[no-untyped-def]
    server = FakeQido(count=50, reach=10).start()
    try:
        gw = gateway(upstream_url=server.url)
        r = curl(f"{gw.web_url}/dicom-web/studies")
        assert r.status == 200 and len(r.json()) == 10
        assert r.headers["warning"].startswith("299 ")
    finally:
        server.stop()


@pytest.mark.parametrize(("status", "expected", "words"), [(503, 503, b"unavailable"), (401, 502, b"credentials")])
def test_archive_failures_become_named_http_errors(gateway, status: int, expected: int, words: bytes) -> None:  # type: ignore[no-untyped-def]
    server = FakeQido(status=status).start()
    try:
        gw = gateway(upstream_url=server.url)
        r = curl(f"{gw.web_url}/dicom-web/studies?PatientName=SECRET*")
        assert r.status == expected and words in r.body
        assert b"SECRET" not in r.body and "SECRET" not in gw.log()
    finally:
        server.stop()


def test_a_full_spool_refuses_stow_with_retry_after(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = gateway(spool={"min_free_mb": 2**39})
    path = tmp_path / "ct.dcm"
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(path, enforce_file_format=True)
    r = curl("-X", "POST", f"{gw.web_url}/dicom-web/studies", "--header", "Content-Type: application/dicom",
             "--data-binary", f"@{path}")
    assert r.status == 503 and r.headers["retry-after"].isdigit()
    assert gw.counts()["queued"] == 0
    assert not any((gw.spool_dir / "incoming").iterdir())


def _cut_off(port: int, head: bytes, body: bytes) -> None:
    """Send a request whose body stops short of its Content-Length, then hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        time.sleep(0.3)


def test_a_stow_body_cut_off_leaves_nothing_behind(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    gw = gateway()
    data = (Path(get_testdata_file("CT_small.dcm"))).read_bytes()
    head = (
        "POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/dicom\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    _cut_off(gw.http_port, head, data[:1000])
    # multipart: the first part complete, the second cut off; the first is stored
    other = pydicom.dcmread(BytesIO(data))
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = BytesIO()
    other.save_as(buffer, enforce_file_format=True)
    content_type, body = build_multipart_related([data, buffer.getvalue()])
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    _cut_off(gw.http_port, head, body[: len(data) + 2000])
    gw.wait_counts(delivered=1)
    wait_until(lambda: gw.log().count("body cut off") == 2, 10, 0.1, "the cut-off bodies were not both logged")
    assert not any((gw.spool_dir / "incoming").iterdir())
    assert "Traceback" not in gw.log() and "Error handling request" not in gw.log()
    assert curl(f"{gw.web_url}/dicom-web/studies").status == 200


def _answer_of(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection."""
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_a_stalled_stow_body_is_answered_408_and_the_connection_closed(gateway) -> None:  # type: ignore[no-untyped-def]
    gw = gateway(http={"idle_timeout": 1})
    data = (Path(get_testdata_file("CT_small.dcm"))).read_bytes()
    other = pydicom.dcmread(BytesIO(data))
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    buffer = BytesIO()
    other.save_as(buffer, enforce_file_format=True)
    content_type, body = build_multipart_related([data, buffer.getvalue()])
    head = f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
    stalls = {
        # the first part whole, then silence: the connection stays open
        "silent": (f"{head}Content-Length: {len(body)}\r\n\r\n".encode(), body[: len(data) + 2000], b""),
        # a malformed chunk size after the first chunk
        "malformed chunk": (
            f"{head}Transfer-Encoding: chunked\r\n\r\n".encode(),
            f"{len(data) + 2000:x}\r\n".encode() + body[: len(data) + 2000] + b"\r\n",
            b"ZZZ\r\nabc\r\n",
        ),
    }
    for name, (request, first, then) in stalls.items():
        with socket.create_connection(("127.0.0.1", gw.http_port), timeout=20) as sock:
            started = time.monotonic()
            sock.sendall(request + first)
            time.sleep(0.3)
            sock.sendall(then)
            answer = _answer_of(sock)  # returns once the gateway closes the connection
            took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), (name, answer[:200])
        assert b"the request body stalled" in answer, name
        assert took < 8, (name, took)  # the body timeout, not aiohttp's lingering or the client's patience
    wait_until(lambda: gw.log().count("no body data for 1 s") == 2, 10, 0.1, "the stalled bodies were not both logged")
    gw.wait_counts(delivered=2)  # each request's first part, complete before its stall, is stored
    assert not any((gw.spool_dir / "incoming").iterdir())
    assert "Traceback" not in gw.log()
    assert curl(f"{gw.web_url}/dicom-web/studies").status == 200


def _one_answer(sock: socket.socket) -> bytes:
    """One whole answer with a Content-Length, read from a kept-alive connection."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head


def _closed_unanswered(sock: socket.socket) -> bool:
    """Whether the gateway closed the connection without answering anything."""
    try:
        return _answer_of(sock) == b""
    except ConnectionResetError:
        return True


def test_a_connection_that_sends_no_whole_request_is_closed_after_the_idle_timeout(gateway) -> None:  # type: ignore[no-untyped-def]
    gw = gateway(http={"idle_timeout": 2})
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=20) as silent, socket.create_connection(
        ("127.0.0.1", gw.http_port), timeout=20
    ) as trickling:
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # closed meanwhile: as good
            for piece in (b"GET /healthz HT", b"TP/1.1\r\nHo", b"st: x\r\n"):  # never the blank line ending the headers
                trickling.sendall(piece)
                time.sleep(0.4)
        assert _closed_unanswered(trickling) and _closed_unanswered(silent)
        took = time.monotonic() - started
    assert 1.5 < took < 10, took  # the idle timeout, where aiohttp's own default would have held them for an hour
    # a client between two requests is closed after it too; one that keeps asking is not
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=20) as sock:
        for _ in range(3):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _one_answer(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(0.5)
        started = time.monotonic()
        assert _closed_unanswered(sock)
        assert time.monotonic() - started < 10
    assert curl(f"{gw.web_url}/healthz").status == 200


def test_unparsable_requests_get_400_and_one_log_line_without_their_bytes(gateway) -> None:  # type: ignore[no-untyped-def]
    gw = gateway()
    marker = "ZEBRAPATIENT"
    requests = {
        "a bad Content-Length": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: " + marker.encode() + b"\r\n\r\n",
        # a QIDO-RS search whose query string is longer than aiohttp reads (8190 bytes)
        "a request line too long": (
            f"GET /dicom-web/studies?PatientName={marker}&".encode() + b"includefield=00100010&" * 500
            + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        "a header line too long": b"GET /healthz HTTP/1.1\r\nX-Name: " + marker.encode() * 1000 + b"\r\n\r\n",
        "a malformed chunk": (
            b"POST /dicom-web/studies HTTP/1.1\r\nHost: x\r\nContent-Type: application/dicom\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + marker.encode() + b"\r\n"
        ),
    }
    for name, request in requests.items():
        with socket.create_connection(("127.0.0.1", gw.http_port), timeout=10) as sock:
            sock.sendall(request)
            answer = _answer_of(sock)
        assert answer.startswith(b"HTTP/1.0 400 ") or answer.startswith(b"HTTP/1.1 400 "), (name, answer[:200])
    wait_until(
        lambda: gw.log().count("malformed HTTP request from 127.0.0.1 refused (400)") == len(requests),
        10, 0.1, "each malformed request was not logged once",
    )
    log = gw.log()
    assert "LineTooLong" in log and "BadHttpMessage" in log
    assert marker not in log
    assert "Traceback" not in log and "ERROR" not in log
    assert curl(f"{gw.web_url}/healthz").status == 200


@pytest.mark.parametrize("stalled", [False, True], ids=["reading", "stalled"])
def test_a_client_closing_mid_answer_is_an_info_line_not_an_error(gateway, tmp_path: Path, stalled: bool) -> None:  # type: ignore[no-untyped-def]
    """Viewers cancel requests as a user scrolls: the write to the closed connection
    was logged at ERROR with a traceback (or as an internal error) for an instance, a
    series and a rendered series. Stalled: the client stops reading first, so the
    gateway's write is waiting for the socket to drain when the connection goes, which
    aiohttp reports differently; that was still an ERROR and a 500 (seen under load)."""
    gw = gateway()
    paths = ct_series(tmp_path / "series", 60, 512, 512) + ct_series(tmp_path / "multi", 1, 512, 512, frames=40)
    assert storescu(gw.port, paths, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=61, timeout=120)
    series_ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    multi = pydicom.dcmread(paths[-1], stop_before_pixels=True)
    series = f"/dicom-web/studies/{series_ds.StudyInstanceUID}/series/{series_ds.SeriesInstanceUID}"
    instance = f"/dicom-web/studies/{multi.StudyInstanceUID}/series/{multi.SeriesInstanceUID}/instances/{multi.SOPInstanceUID}"
    cases = {
        instance: "application/dicom",  # 20 MB in one part
        series: 'multipart/related; type="application/dicom"',
        f"{series}/rendered": "multipart/related; type=image/png",
    }
    for path, accept in cases.items():
        with socket.socket() as sock:
            if stalled:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the window closes after a few KB
            sock.settimeout(20)
            sock.connect(("127.0.0.1", gw.http_port))
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n".encode())
            assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
            if stalled:
                time.sleep(2)  # the gateway fills its send buffer and waits for it to drain
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, as a cancelled fetch does
    wait_until(
        lambda: gw.log().count("the client closed the connection before the answer was complete") == len(cases),
        20, 0.1, "each cancelled answer was not logged once",
    )
    log = gw.log()
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
    metrics = urllib.request.urlopen(f"{gw.web_url}/metrics", timeout=10).read().decode()
    assert 'status="499"' in metrics
    assert curl(f"{gw.web_url}{series}/metadata").status == 200


def test_a_frame_whose_codestream_claims_a_huge_image_is_refused_without_decoding(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A 64 x 64 instance whose 1 KB JPEG-LS frame says 30000 x 30000 in its header:
    asked as ELE frames and rendered, it is answered 406 at once. On the code before,
    each request decoded 900 million samples: 90 s, and the daemon's memory peaked at
    5.2 and 7 GB."""
    image = (np.arange(64 * 64, dtype=np.uint16) % 4096).reshape(64, 64)
    frame = bytearray(imagecodecs.jpegls_encode(image))
    struct.pack_into(">HH", frame, frame.find(b"\xff\xf7") + 5, 30000, 30000)
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 64, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    gw = gateway()
    assert curl(f"{gw.web_url}/dicom-web/studies", "-X", "POST", "--data-binary", f"@{tmp_path / 'huge.dcm'}",
                "-H", "Content-Type: application/dicom").status == 200
    gw.wait_counts(delivered=1, timeout=30)
    instance = f"{gw.web_url}/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    for url, accept in ((f"{instance}/frames/1", "multipart/related; type=application/octet-stream"), (f"{instance}/rendered", "image/png")):
        started = time.monotonic()
        answer = curl(url, "-H", f"Accept: {accept}")
        assert answer.status == 406 and b"codestream describes 900000000 samples" in answer.body, answer.body
        assert time.monotonic() - started < 5
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    assert peak < 300 * 1024, f"peak RSS {peak} kB"


def test_a_stow_of_thousands_of_garbage_parts_is_one_warning(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """2,000 parts that are no DICOM and one instance: the instance is stored, each
    bad part fails with its reason in the answer, and the log says so in one line. On
    the code before, each refused part wrote its own warning (100,000 of them for a
    4 MB body), enough to trip journald's rate limit and lose the lines that matter."""
    [good] = ct_series(tmp_path / "ct", 1, 32, 32)
    content_type, body = build_multipart_related([good.read_bytes()] + [b"not dicom"] * 2000)
    (tmp_path / "body").write_bytes(body)
    gw = gateway()
    answer = curl(f"{gw.web_url}/dicom-web/studies", "-X", "POST", "--data-binary", f"@{tmp_path / 'body'}",
                  "-H", f"Content-Type: {content_type}", "-H", "Accept: application/dicom+json")
    assert answer.status == 202
    module = json.loads(answer.body)
    assert len(module["00081199"]["Value"]) == 1 and len(module["00081198"]["Value"]) == 2000
    gw.wait_counts(delivered=1, timeout=30)
    lines = [line for line in gw.log().splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(lines) == 1, lines[:5]
    assert "STOW-RS from 127.0.0.1: 1 stored, 2000 failed (2000 x malformed data set: no DICM prefix)" in lines[0]


def test_a_metadata_stow_of_thousands_of_bad_parts_is_one_warning_each_kind(gateway, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The metadata flavour of the test above: 2,000 unreadable JSON parts and 2,000
    bulk data parts that no metadata can name (no Content-Location). Each unreadable
    part fails in the answer; the log has one line for the failures and one for the
    parts ignored, where the code before wrote 4,000."""
    parts = [b"--B\r\nContent-Type: application/dicom+json\r\n\r\n{not json\r\n"] * 2000
    parts += [b"--B\r\nContent-Type: application/octet-stream\r\n\r\nxx\r\n"] * 2000
    (tmp_path / "body").write_bytes(b"".join(parts) + b"--B--\r\n")
    gw = gateway()
    answer = curl(f"{gw.web_url}/dicom-web/studies", "-X", "POST", "--data-binary", f"@{tmp_path / 'body'}",
                  "-H", 'Content-Type: multipart/related; type="application/dicom+json"; boundary=B',
                  "-H", "Accept: application/dicom+json")
    assert answer.status == 409
    assert len(json.loads(answer.body)["00081198"]["Value"]) == 2000
    lines = [line for line in gw.log().splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(lines) == 2, lines[:5]
    assert "2000 bulk data part(s) without Content-Location ignored" in lines[0]
    assert "0 stored, 2000 failed (2000 x metadata part unreadable)" in lines[1]
