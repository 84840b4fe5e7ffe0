"""Hostile and broken input on the DIMSE port: a clean rejection, and the next
association still works."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from gateway.dimse.command import encode_command
from tests.support import dcmtk
from tests.support.deflated import deflated_instance
from tests.support.nested import nested_instance
from tests.support.ports import wait_until
from tests.support.rawdimse import associate_rq, hold, read_exactly, read_pdu_header
from tests.support.pyscu import send_files


def assert_alive(gw) -> None:
    assert gw.running, gw.log()
    result = dcmtk.echoscu(gw.port, gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_garbage_bytes(gateway) -> None:
    gw = gateway()
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)) * 8)
        reply = read_until_closed(sock)
    # Either an A-ABORT (PDU type 0x07) or a plain close; never a hang.
    assert reply == b"" or reply[0] == 0x07
    assert_alive(gw)


def test_truncated_pdu_does_not_block_others(gateway) -> None:
    gw = gateway(dimse={"network_timeout": 3, "acse_timeout": 3})
    # A-ASSOCIATE-RQ header announcing 1000 bytes, of which we send 10, then stall.
    stalled = socket.create_connection(("127.0.0.1", gw.port))
    stalled.sendall(struct.pack(">BBI", 0x01, 0x00, 1000) + b"\x00\x01" + b"\x00" * 8)
    try:
        assert_alive(gw)  # another association is served meanwhile
        read_until_closed(stalled, timeout=20)  # the stalled one is dropped, not kept forever
    finally:
        stalled.close()
    # And a truncated PDU followed by a close.
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(struct.pack(">BBI", 0x01, 0x00, 500) + b"\x00\x01\x00\x00")
    assert_alive(gw)


def _file_with_dataset_bytes(path: Path, sop_uid: str, dataset: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with open(path, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(fh, meta, enforce_standard=True)
        fh.write(dataset)
    return path


def _instance(tmp_path: Path, name: str, **overrides: str) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "BAD-INPUT"
    for key, value in overrides.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_malformed_datasets_are_refused(tmp_path: Path, gateway) -> None:
    gw = gateway()
    garbage = _file_with_dataset_bytes(
        tmp_path / "garbage.dcm", generate_uid(), b"\x08\x00\x16\x00UI\xff\xff" + b"\xab" * 300
    )
    truncated_body = _instance(tmp_path, "full.dcm").read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(truncated_body[:-40])
    traversal = _instance(tmp_path, "traversal.dcm", StudyInstanceUID="../../../etc")
    no_study = _instance(tmp_path, "nostudy.dcm")
    ds = pydicom.dcmread(no_study)
    del ds.StudyInstanceUID
    ds.save_as(no_study)
    good = _instance(tmp_path, "good.dcm")

    statuses = send_files(gw.port, [garbage, truncated, traversal, no_study, good], gw.ae_title)
    for name, status in zip(("garbage", "truncated", "traversal", "no study"), statuses):
        assert status in (0xA900, 0xC000), f"{name}: {status:#06x}"
    assert statuses[4] == 0x0000
    assert_alive(gw)
    gw.wait_counts(delivered=1, timeout=30)
    assert sum(gw.counts().values()) == 1
    assert not any((gw.spool_dir / "incoming").iterdir())
    assert "rejected" in gw.log()
    # What an admin graphs per modality: one stored, four refused, from PYSCU.
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=10).read().decode()
    assert 'gateway_dimse_instances_received_total{calling_ae="PYSCU",result="stored"} 1.0' in metrics
    assert 'gateway_dimse_instances_received_total{calling_ae="PYSCU",result="refused"} 4.0' in metrics


@pytest.mark.parametrize("upstream", ["local"])
def test_below_free_space_floor_refuses_with_a700(tmp_path: Path, gateway, upstream: str) -> None:
    gw = gateway(spool={"min_free_mb": 1_000_000_000})
    path = _instance(tmp_path, "one.dcm")
    (status,) = send_files(gw.port, [path], gw.ae_title)
    assert status == 0xA700
    assert sum(gw.counts().values()) == 0
    assert "spool free space" in gw.log()
    assert_alive(gw)


def test_a_deflate_bomb_is_refused_without_inflating_it_in_memory(tmp_path: Path, gateway) -> None:
    """300 KB of Deflated Explicit VR Little Endian that inflate to 300 MiB: refused
    with 0xC000 and the reason, the daemon's memory never near the inflated size (on
    the code before, pydicom inflated it whole to read its UIDs: 713 MB peak); a small
    deflated instance on the same association is stored."""
    gw = gateway()
    bomb_data, bomb_uid = deflated_instance(300 << 20)
    small_data, small_uid = deflated_instance(1000)
    bomb, small = tmp_path / "bomb.dcm", tmp_path / "small.dcm"
    bomb.write_bytes(bomb_data)
    small.write_bytes(small_data)
    assert len(bomb_data) < 1 << 20
    # -xd: propose Deflated Explicit VR Little Endian, so the files go as they are
    result = dcmtk.storescu(gw.port, [small, bomb], gw.ae_title, extra_args=["-xd", "-nh", "-v"])
    output = result.stdout + result.stderr
    responses = [line for line in output.splitlines() if "Received Store Response" in line]
    assert responses == ["I: Received Store Response (Success)", "I: Received Store Response (Error: CannotUnderstand)"], output
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    assert peak < 250 * 1024, f"peak RSS {peak} kB"
    wait_until(lambda: "deflated data set inflates beyond 256 MiB" in gw.log(), 10, 0.1, "the refusal was not logged")
    gw.wait_counts(delivered=1, timeout=30)
    assert sum(gw.counts().values()) == 1
    assert bomb_uid not in "".join(p.name for p in (gw.spool_dir / "incoming").iterdir())
    assert_alive(gw)


def test_a_wildcard_pattern_that_backtracks_does_not_stop_the_daemon(tmp_path: Path, gateway) -> None:
    """C-FIND PatientName ``*A`` twenty times then ``B`` against a stored name of sixty
    A's: matched by a regular expression, it held the event loop, and a C-ECHO on
    another association timed out. Now the search ends, and the echo is answered."""
    gw = gateway()
    path = _instance(tmp_path, "long-name.dcm", PatientName="A" * 60)
    assert dcmtk.storescu(gw.port, [path], gw.ae_title).returncode == 0
    gw.wait_counts(delivered=1, timeout=30)
    search = subprocess.Popen(
        [str(dcmtk.DCMTK_BIN / "findscu"), "-S", "-v", "-aec", gw.ae_title, "-k", "QueryRetrieveLevel=STUDY",
         "-k", "PatientName=" + "*A" * 20 + "B", "127.0.0.1", str(gw.port)],
        env=dcmtk.dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = search.communicate(timeout=30)
    finally:
        search.kill()
    assert "Received Final Find Response (Success)" in output and "Find Response: 1" not in output, output
    assert dcmtk.echoscu(gw.port, gw.ae_title, timeout=10).returncode == 0


def test_sequences_nested_hundreds_deep_are_refused_and_32_levels_reach_the_archive(
    tmp_path: Path, gateway, orthanc
) -> None:
    """Sequences nested 600 deep, in 22 KB: refused by C-STORE (0xC000) and STOW-RS
    with the reason. On the code before, storescu's defined-length copy was
    acknowledged, and delivering it killed Orthanc (which dies at 48 levels); over the
    embedded archive its study's metadata answered 500 with a RecursionError
    traceback. 32 levels reach Orthanc, which stays up, and the facade serves them."""
    gw = gateway(upstream_url=orthanc.dicomweb_url)
    kept, sop, study, series = nested_instance(32)
    (tmp_path / "nested-32.dcm").write_bytes(kept)
    (tmp_path / "nested-600.dcm").write_bytes(nested_instance(600)[0])
    result = dcmtk.storescu(gw.port, [tmp_path / "nested-32.dcm", tmp_path / "nested-600.dcm"], gw.ae_title, extra_args=["-v"])
    output = result.stdout + result.stderr
    responses = [line for line in output.splitlines() if "Received Store Response" in line]
    assert responses == ["I: Received Store Response (Success)", "I: Received Store Response (Error: CannotUnderstand)"], output
    wait_until(lambda: "sequences nested deeper than 32 levels" in gw.log(), 10, 0.1, "the refusal was not logged")

    stow = urllib.request.Request(f"{gw.web_url}/dicom-web/studies", data=nested_instance(600)[0], method="POST",
                                  headers={"Content-Type": "application/dicom", "Accept": "application/dicom+json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stow, timeout=30)
    answer = json.loads(refused.value.read())
    assert refused.value.code == 409
    assert answer["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000], answer

    gw.wait_counts(delivered=1, timeout=30)
    assert sum(gw.counts().values()) == 1
    assert orthanc.running and orthanc.instance_count() == 1
    instance = urllib.request.Request(f"{gw.web_url}/dicom-web/studies/{study}/series/{series}/instances/{sop}",
                                      headers={"Accept": "application/dicom; transfer-syntax=*"})
    with urllib.request.urlopen(instance, timeout=30) as resp:
        item, depth = pydicom.dcmread(io.BytesIO(resp.read())), 0
    while "ContentSequence" in item:
        item, depth = item.ContentSequence[0], depth + 1
    assert depth == 32
    assert "Traceback" not in gw.log()
    assert_alive(gw)


def test_a_client_breaking_rules_in_a_loop_gets_ten_warnings_a_minute(gateway) -> None:
    """200 connections that each send a broken PDU, and 200 HTTP requests aiohttp cannot
    parse: each listener logs the first ten in the minute, and every one is refused.
    Before, each wrote its own warning: a scanner in a loop filled the journal."""
    gw = gateway()
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
            sock.sendall(struct.pack(">BBI", 0x01, 0x00, 100) + b"\x00\x01")  # cut short
    for _ in range(200):
        with socket.create_connection(("127.0.0.1", gw.http_port), timeout=5) as sock:
            sock.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_closed(sock).split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    wait_until(lambda: gw.log().count("before association") == 10, 10, 0.1, "not ten DIMSE warnings")
    log = gw.log()
    assert log.count("malformed HTTP request from") == 10, log[-2000:]
    assert_alive(gw)


def _pdata(payload: bytes, control: int) -> bytes:
    """One P-DATA-TF PDU holding one PDV on presentation context 1."""
    pdv = struct.pack(">IB", len(payload) + 2, 1) + bytes([control]) + payload
    return struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv


def _peak_rss_mb(gw) -> int:  # type: ignore[no-untyped-def]
    status = Path(f"/proc/{gw.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) // 1024


def test_a_command_set_that_never_ends_is_aborted(gateway) -> None:
    """Command fragments that never say "last": the association is aborted past 64 KiB.
    Before, 300 MiB of them took 300 MiB of the daemon's memory, and more would take all."""
    gw = gateway()
    before = _peak_rss_mb(gw)
    with hold(gw.port, gw.ae_title, "ENDLESS") as sock:
        fragment = _pdata(b"\x00" * 16000, 0x01)  # command, not the last fragment
        with pytest.raises(OSError):
            for _ in range(6400):  # 100 MiB
                sock.sendall(fragment)
    assert _peak_rss_mb(gw) - before < 20
    wait_until(lambda: "command set longer than 65536 bytes" in gw.log(), 10, 0.1, "the abort was not logged")
    assert_alive(gw)


def test_requests_sent_without_reading_the_answers_are_held_back(gateway) -> None:
    """No asynchronous operations window is negotiated, so a requester waits for each
    answer. One that sends 50,000 C-ECHO-RQs and reads nothing is read no further while
    16 requests are queued, and TCP holds it back once the answers fill the buffers;
    before, the daemon queued them all (760 MB for 200,000)."""
    gw = gateway()
    before = _peak_rss_mb(gw)
    echo = encode_command({0x0002: "1.2.840.10008.1.1", 0x0100: 0x0030, 0x0110: 1, 0x0800: 0x0101})
    burst = _pdata(echo, 0x03) * 1000
    with hold(gw.port, gw.ae_title, "PIPELINE") as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(3)
        with contextlib.suppress(TimeoutError):  # held back: the point
            for _ in range(50):
                sock.sendall(burst)
        assert_alive(gw)  # another association is served meanwhile
    assert _peak_rss_mb(gw) - before < 40


def test_a_peer_announcing_a_tiny_maximum_pdu_is_rejected(gateway) -> None:
    """A requester may announce how long the PDUs it receives may be; at 7 bytes, each
    512 KB instance of a C-GET went as 524,288 PDUs, 0.24 s of the event loop every
    association shares. Below 1024 bytes the association is rejected, and said why."""
    gw = gateway()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(associate_rq(gw.ae_title, "TINYPDU", max_pdu=16))
        kind, length = read_pdu_header(sock)
        body = read_exactly(sock, length)
    assert kind == 0x03 and tuple(body[1:4]) == (1, 1, 1), (kind, body)  # A-ASSOCIATE-RJ, permanent, no reason given
    wait_until(lambda: "maximum PDU length 16 is below the 1024 bytes" in gw.log(), 10, 0.1, "the rejection was not logged")
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(associate_rq(gw.ae_title, "FAIRPDU", max_pdu=1024))
        assert read_pdu_header(sock)[0] == 0x02  # A-ASSOCIATE-AC
    assert_alive(gw)
