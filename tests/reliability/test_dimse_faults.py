"""Faults of the DIMSE layer that leave a peer waiting: an operation longer than the
idle timeout, a service that raises, a receiver that stops reading, a C-STORE-RQ
without a data set, instances whose SOP class nobody knows.

Real processes throughout (the daemon, dcmtk's movescu and storescp, Orthanc as the
archive, storescp made slow with --sleep-during), except where nothing real misbehaves on
demand: `StalledPeer` accepts an association by hand and then
never reads, and the C-GET requester that stops reading is a raw socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE

from tests.integration.test_move_retrieve import failed_list, parse_move, peers
from tests.support.daemon import Gateway
from tests.support.dcmtk import DCMTK_BIN, StoreSCP, dcmtk_env, echoscu, movescu, storescu
from tests.support.orthanc import Orthanc
from tests.support.ports import free_port
from tests.support.pyscu import echo
from tests.support.synth import ct_series

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"


def sop_uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]


def assert_healthy(gw: Gateway) -> None:
    """The daemon runs, answers /healthz and a C-ECHO."""
    assert gw.running, gw.log()[-3000:]
    assert "spool" in gw.health()
    result = echoscu(gw.port, gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr


# -- a slow archive ---------------------------------------------------------------------------


@dataclass
class SlowEnv:
    gateway: Gateway
    scp: StoreSCP
    series: list[Path]


# The destination takes about three seconds over each C-STORE (storescp --sleep-during
# sleeps a second at each of its progress callbacks: the start, the data, the end), so
# a move of SLOW_COUNT instances lasts ~12 s, well beyond the idle timeout, and a
# C-CANCEL sent at the first Pending (after pending_seconds) always finds instances
# left to send. (A slow archive would not do: the first 64 instances are fetched
# before the first is sent, so the sends themselves would race the C-CANCEL.)
SLOW_COUNT = 4
IDLE_TIMEOUT = 2


@pytest.fixture(scope="module")
def slow_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlowEnv]:
    root = tmp_path_factory.mktemp("slow")
    series = ct_series(root / "series", SLOW_COUNT, 32, 32)
    scp = StoreSCP(output_dir=root / "dest", extra_args=["--sleep-during", "1"]).start()
    orthanc = Orthanc(workdir=root / "orthanc")
    gateway: Gateway | None = None
    try:
        orthanc.start()
        orthanc.upload(series)
        gateway = Gateway(
            root / "gw",
            upstream_url=orthanc.dicomweb_url,
            extra=peers(("STORESCP", scp.port)) + "\n[retrieve]\nfetch_concurrency = 1\npending_seconds = 3\n",
            dimse={"network_timeout": IDLE_TIMEOUT},
        ).start()
        yield SlowEnv(gateway, scp, series)
    finally:
        if gateway is not None:
            gateway.kill()
        scp.cleanup()
        orthanc.cleanup()


def image_keys(paths: list[Path]) -> dict[str, str]:
    """IMAGE level, every instance named: one WADO-RS request per instance."""
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    return {
        "QueryRetrieveLevel": "IMAGE",
        "StudyInstanceUID": str(first.StudyInstanceUID),
        "SeriesInstanceUID": str(first.SeriesInstanceUID),
        "SOPInstanceUID": "\\".join(sop_uids(paths)),
    }


@pytest.mark.slow
def test_move_longer_than_the_idle_timeout_succeeds(slow_env: SlowEnv) -> None:
    """``network_timeout = 2`` and a C-MOVE that takes ~12 s (a slow destination),
    during which movescu sends nothing: the move is not aborted, it ends with
    Success and every instance arrives."""
    for path in slow_env.scp.files():
        path.unlink()
    started = time.monotonic()
    proc = movescu(slow_env.gateway.port, "DICOMGW", "STORESCP", image_keys(slow_env.series), extra_args=["-v", "-d"], timeout=60)
    took = time.monotonic() - started
    result = parse_move(proc)
    assert (result.status, result.completed, result.failed, result.warning) == (0, SLOW_COUNT, 0, 0), result.output[-3000:]
    assert took > 2 * IDLE_TIMEOUT, took  # the scenario really outlasted the idle timeout
    received = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in slow_env.scp.wait_for_files(SLOW_COUNT)}
    assert received == set(sop_uids(slow_env.series))
    assert "network timeout" not in slow_env.gateway.log()


@pytest.mark.slow
def test_cancel_read_while_a_long_move_runs(slow_env: SlowEnv) -> None:
    """The reader keeps reading during an operation: a C-CANCEL sent after the first
    Pending response (at ~3 s, past the 2 s idle timeout) stops the move with Cancel
    (0xFE00), the counts adding up."""
    proc = movescu(
        slow_env.gateway.port, "DICOMGW", "STORESCP", image_keys(slow_env.series),
        extra_args=["-v", "-d", "--cancel", "1"], timeout=60,
    )
    result = parse_move(proc)
    assert result.status == 0xFE00, result.output[-3000:]
    assert 0 < result.completed < SLOW_COUNT and result.remaining > 0, result.output[-3000:]
    assert result.completed + result.remaining + result.failed + result.warning == SLOW_COUNT
    assert_healthy(slow_env.gateway)


# -- a service that raises ---------------------------------------------------------------------


def test_raising_handler_answers_and_association_survives(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A DimseServer whose C-FIND and C-STORE services raise: pynetdicom gets 0x0110
    (Processing failure) and 0xA700 (Out of resources) instead of waiting for ever,
    each traceback is logged at ERROR, and a C-ECHO on the same association is still
    served."""
    from gateway.config import parse_config
    from gateway.dimse.command import C_FIND_RQ, C_STORE_RQ
    from gateway.dimse.server import UNCOMPRESSED, DimseServer
    from gateway.spool.queue import Spool

    async def boom(assoc: object, message: object) -> None:
        raise RuntimeError("service bug")

    ds = pydicom.dcmread(ct_series(tmp_path / "one", 1, 16, 16)[0])
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""

    def client(port: int) -> tuple[int, int, int]:
        ae = AE("PYSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMGW")
        assert assoc.is_established
        try:
            find = [status.Status for status, _ in assoc.send_c_find(query, STUDY_ROOT_FIND) if status]
            store = assoc.send_c_store(ds)
            return (find[-1] if find else -1, store.Status if store else -1, echo(assoc))
        finally:
            assoc.release()

    async def main() -> tuple[int, int, int]:
        config = parse_config({"dimse": {"host": "127.0.0.1", "port": free_port()}, "spool": {"directory": str(tmp_path / "spool")}})
        spool = Spool(config.spool)
        server = DimseServer(config, spool.receive, {C_FIND_RQ: boom, C_STORE_RQ: boom}, {STUDY_ROOT_FIND: UNCOMPRESSED})
        await server.start()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, client, config.dimse.port)
        finally:
            await server.stop(2)

    with caplog.at_level(logging.ERROR, logger="gateway.dimse"):
        assert asyncio.run(asyncio.wait_for(main(), 60)) == (0x0110, 0xA700, 0x0000)
    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info and "service bug" in str(r.exc_info[1])]
    assert len(failures) == 2, caplog.text


def write_without_sop_class(source: Path, target: Path) -> str:
    """A copy of ``source`` with SOPClassUID removed from the data set and the File
    Meta: an instance no C-STORE can carry (AffectedSOPClassUID is mandatory)."""
    ds = pydicom.dcmread(source)
    del ds.SOPClassUID
    del ds.file_meta.MediaStorageSOPClassUID
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    with open(target, "wb") as fh:
        fh.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta, enforce_standard=False)
        fh.write(body.getvalue())
    return str(ds.SOPInstanceUID)


def test_move_of_instances_without_a_sop_class(tmp_path: Path, orthanc: Orthanc, storescp) -> None:  # type: ignore[no-untyped-def]
    """Orthanc keeps instances without SOPClassUID (its QIDO-RS answer then has none,
    its WADO-RS file no MediaStorageSOPClassUID): nothing can be proposed for them.
    A series of two CT and one such instance ends with Warning (0xB000), the CT sent,
    the other failed and listed; a series of only such instances ends with 0xA702,
    all listed. Neither leaves movescu waiting."""
    scp = storescp()
    mixed = ct_series(tmp_path / "mixed", 3, 16, 16)
    odd = write_without_sop_class(mixed[2], mixed[2])
    alone = ct_series(tmp_path / "alone", 2, 16, 16)
    alone_uids = {write_without_sop_class(p, p) for p in alone}
    orthanc.upload(mixed + alone)
    gw = Gateway(tmp_path / "gw", upstream_url=orthanc.dicomweb_url, extra=peers(("STORESCP", scp.port))).start()
    try:

        def move(paths: list[Path]):  # type: ignore[no-untyped-def]
            first = pydicom.dcmread(paths[0], stop_before_pixels=True, force=True)
            keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": str(first.StudyInstanceUID), "SeriesInstanceUID": str(first.SeriesInstanceUID)}
            return parse_move(movescu(gw.port, "DICOMGW", "STORESCP", keys, extra_args=["-v", "-d", "-td", "20"], timeout=60))

        result = move(mixed)
        assert (result.status, result.completed, result.failed) == (0xB000, 2, 1), result.output[-3000:]
        assert failed_list(result) == {odd}, result.output[-3000:]
        result = move(alone)
        assert (result.status, result.completed, result.failed) == (0xA702, 0, 2), result.output[-3000:]
        assert failed_list(result) == alone_uids, result.output[-3000:]
        assert "no SOP Class UID" in gw.log()
        assert_healthy(gw)
    finally:
        gw.kill()


# -- a receiver that stops reading ------------------------------------------------------------


def _items(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(data):
        item_type, length = data[offset], struct.unpack_from(">H", data, offset + 2)[0]
        yield item_type, data[offset + 4 : offset + 4 + length]
        offset += 4 + length


def associate_ac(rq: bytes) -> bytes:
    """An A-ASSOCIATE-AC (PS3.8 9.3.3) to the A-ASSOCIATE-RQ ``rq`` (body, after the
    PDU header) accepting every proposed context with its first transfer syntax."""
    contexts = b""
    for item_type, value in _items(rq, 68):
        if item_type != 0x20:
            continue
        syntaxes = [sub for sub_type, sub in _items(value, 4) if sub_type == 0x40]
        ts = struct.pack(">BBH", 0x40, 0, len(syntaxes[0])) + syntaxes[0]
        contexts += struct.pack(">BBHBBBB", 0x21, 0, 4 + len(ts), value[0], 0, 0, 0) + ts
    app = b"1.2.840.10008.3.1.1.1"
    impl = b"1.2.826.0.1.3680043.9.7433.1.1"
    user = struct.pack(">BBHI", 0x51, 0, 4, 16384) + struct.pack(">BBH", 0x52, 0, len(impl)) + impl
    body = (
        rq[:68]
        + struct.pack(">BBH", 0x10, 0, len(app)) + app
        + contexts
        + struct.pack(">BBH", 0x50, 0, len(user)) + user
    )
    return struct.pack(">BBI", 0x02, 0, len(body)) + body


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


class StalledPeer:
    """A move destination that accepts one association, then never reads its socket.

    Its receive buffer is made small, so the sender's buffers fill after a few MB.
    ``closed()`` then reads what was buffered and tells whether the sender closed the
    connection (it should, rather than keep it open for ever).
    """

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.connection: socket.socket | None = None
        self.associated = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.connection = conn
        header = recv_exactly(conn, 6)
        rq = recv_exactly(conn, struct.unpack(">I", header[2:])[0])
        conn.sendall(associate_ac(rq))
        self.associated.set()

    def closed(self, timeout: float = 20.0) -> bool:
        conn = self.connection
        if conn is None:
            return False
        conn.settimeout(timeout)
        try:
            while conn.recv(1 << 20):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        for sock in (self.connection, self.listener):
            if sock is not None:
                sock.close()


@pytest.fixture
def big_series(tmp_path: Path) -> list[Path]:
    """Two 24 MB instances: more than the socket buffers on both sides hold."""
    return ct_series(tmp_path / "big", 2, 2048, 2048, frames=3)


def local_gateway_with(tmp_path: Path, paths: list[Path], dimse: dict[str, object], extra: str = "") -> Gateway:
    """A gateway on its embedded archive holding ``paths`` (stored by storescu)."""
    gw = Gateway(tmp_path / "gw", dimse=dimse, extra=extra).start()
    result = storescu(gw.port, paths, gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    gw.wait_counts(delivered=len(paths), timeout=60)
    return gw


@pytest.mark.slow
def test_move_to_destination_that_stops_reading(tmp_path: Path, big_series: list[Path]) -> None:
    """The destination takes the association, then reads nothing. With
    ``dimse_timeout = 2`` the C-MOVE ends in bounded time with 0xA702, every instance
    failed and listed; the gateway closes the stalled connection and stays healthy."""
    peer = StalledPeer()
    gw = local_gateway_with(tmp_path, big_series, {"dimse_timeout": 2}, peers(("STALLED", peer.port)))
    try:
        first = pydicom.dcmread(big_series[0], stop_before_pixels=True)
        started = time.monotonic()
        proc = movescu(
            gw.port, "DICOMGW", "STALLED", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(first.StudyInstanceUID)},
            extra_args=["-v", "-d", "-td", "30"], timeout=60,
        )
        took = time.monotonic() - started
        result = parse_move(proc)
        assert peer.associated.is_set()
        assert (result.status, result.completed, result.failed) == (0xA702, 0, 2), result.output[-3000:]
        assert failed_list(result) == set(sop_uids(big_series)), result.output[-3000:]
        assert took < 20, took
        assert peer.closed(), "the gateway kept the stalled connection open"
        assert "receiver association lost" in gw.log()
        assert_healthy(gw)
    finally:
        gw.kill()
        peer.close()


@pytest.mark.slow
def test_shutdown_during_a_move_to_a_destination_that_stops_reading(tmp_path: Path, big_series: list[Path]) -> None:
    """A C-MOVE blocked on a destination that stopped reading (``dimse_timeout`` 60 s),
    and a SIGTERM: the daemon stops within its grace period plus a few seconds; the
    half-sent association to the destination is dropped, not released (a release would
    wait on the same stalled peer)."""
    peer = StalledPeer()
    gw = local_gateway_with(tmp_path, big_series, {"dimse_timeout": 60}, peers(("STALLED", peer.port)))  # shutdown_grace = 5
    first = pydicom.dcmread(big_series[0], stop_before_pixels=True)
    mover = subprocess.Popen(
        [str(DCMTK_BIN / "movescu"), "-S", "-aec", gw.ae_title, "-aem", "STALLED", "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={first.StudyInstanceUID}", "127.0.0.1", str(gw.port)],
        env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        assert peer.associated.wait(20)
        time.sleep(1)  # the gateway is now blocked writing the first 24 MB sub-operation
        started = time.monotonic()
        assert gw.stop(timeout=30) == 0
        assert time.monotonic() - started < 12
        assert peer.closed(), "the stalled connection outlived the daemon"
    finally:
        mover.kill()
        mover.wait()
        gw.kill()
        peer.close()


def get_request(called_ae: str, study_uid: str) -> tuple[bytes, bytes]:
    """A-ASSOCIATE-RQ (Study Root C-GET, CT storage with the SCP role) then the C-GET-RQ
    of ``study_uid``, as raw PDUs."""
    from gateway.dimse import pdu
    from gateway.dimse.command import C_GET_RQ, HAS_DATASET, encode_command

    contexts = [
        pdu.PresentationContextRQ(1, STUDY_ROOT_GET, [ExplicitVRLittleEndian]),
        pdu.PresentationContextRQ(3, CTImageStorage, [ExplicitVRLittleEndian]),
    ]
    rq = pdu.encode_associate_rq(called_ae, "STALLGET", contexts, 16384, "1.2.3.4", "STALL", [pdu.RoleSelection(CTImageStorage, False, True)])
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study_uid
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, identifier)
    command = encode_command({0x0003: STUDY_ROOT_GET, 0x0100: C_GET_RQ, 0x0110: 1, 0x0700: 0, 0x0800: HAS_DATASET})
    return rq, b"".join(pdu.encode_pdata(1, command, True, 16384) + pdu.encode_pdata(1, body.getvalue(), False, 16384))


@pytest.mark.slow
def test_shutdown_with_a_get_requester_that_stops_reading(tmp_path: Path, big_series: list[Path]) -> None:
    """A C-GET requester that stops reading while its sub-operations are sent, and a
    SIGTERM: the daemon stops within its grace period plus a few seconds, rather than
    waiting for ever to write its A-ABORT."""
    gw = local_gateway_with(tmp_path, big_series, {"dimse_timeout": 60})  # shutdown_grace = 5
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    try:
        sock.connect(("127.0.0.1", gw.port))
        rq, get = get_request(gw.ae_title, str(pydicom.dcmread(big_series[0], stop_before_pixels=True).StudyInstanceUID))
        sock.sendall(rq)
        header = recv_exactly(sock, 6)
        assert header[0] == 0x02, header
        recv_exactly(sock, struct.unpack(">I", header[2:])[0])
        sock.sendall(get)
        time.sleep(2)  # the gateway is now blocked writing the first 24 MB sub-operation
        started = time.monotonic()
        assert gw.stop(timeout=30) == 0
        assert time.monotonic() - started < 12
    finally:
        gw.kill()
        sock.close()


# -- a C-STORE-RQ without a data set ------------------------------------------------------------


def test_store_request_without_dataset_is_answered(tmp_path: Path, gateway) -> None:  # type: ignore[no-untyped-def]
    """A C-STORE-RQ whose CommandDataSetType says no data set follows (0x0101): the
    sender gets 0xC000 (Cannot understand) with a log line, nothing is spooled, and the
    association goes on (a C-ECHO on it is answered)."""
    gw = gateway()
    ae = AE("PYSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title)
    assert assoc.is_established
    try:
        request = C_STORE()
        request.MessageID = 7
        request.AffectedSOPClassUID = CTImageStorage
        request.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1137.13.1"
        request.Priority = 0
        context = next(c for c in assoc.accepted_contexts if c.abstract_syntax == CTImageStorage)
        # As pynetdicom's own send_c_echo does: pause its reactor, which would otherwise
        # take the response as an unexpected message.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        assoc.dimse.send_msg(request, context.context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
        assert rsp is not None, "no C-STORE-RSP"
        assert (rsp.MessageIDBeingRespondedTo, rsp.Status) == (7, 0xC000)
        # the C-ECHO too with the reactor paused: resumed, it may take the response
        # first ("unexpected C-ECHO service message") and leave send_c_echo to time out
        echo_rq = C_ECHO()
        echo_rq.MessageID = 8
        echo_rq.AffectedSOPClassUID = "1.2.840.10008.1.1"
        verification = next(c for c in assoc.accepted_contexts if c.abstract_syntax == "1.2.840.10008.1.1")
        assoc.dimse.send_msg(echo_rq, verification.context_id)
        _, echo_rsp = assoc.dimse.get_msg(block=True)
        assoc._reactor_checkpoint.set()
        assert echo_rsp is not None and (echo_rsp.MessageIDBeingRespondedTo, echo_rsp.Status) == (8, 0x0000)
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()
    assert "without a data set" in gw.log()
    assert sum(gw.counts().values()) == 0
    assert_healthy(gw)


def test_a_destination_accepting_with_a_tiny_maximum_pdu_is_aborted(tmp_path: Path) -> None:
    """A move destination (pynetdicom here) that accepts with a maximum PDU length of 7
    bytes would have each 512 KB instance sent as 524,288 PDUs on the event loop every
    association shares. The gateway aborts that association: the C-MOVE fails its
    sub-operations with the reason logged, and the destination receives nothing."""
    received: list[str] = []
    destination = AE(ae_title="TINYDEST")
    destination.maximum_pdu_size = 7
    destination.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)

    def on_store(event) -> int:  # type: ignore[no-untyped-def]
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    port = free_port()
    server = destination.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    paths = ct_series(tmp_path / "ct", 2)
    gw = local_gateway_with(tmp_path, paths, {}, peers(("TINYDEST", port)))
    try:
        study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        result = parse_move(movescu(gw.port, "DICOMGW", "TINYDEST", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}, extra_args=["-v", "-d"]))
        assert (result.status, result.completed, result.failed) == (0xA702, 0, 2), result.output[-3000:]
        assert "TINYDEST at 127.0.0.1:%d accepted with a maximum PDU length of 7 bytes, below the 1024" % port in gw.log()
        assert received == []
    finally:
        gw.kill()
        server.shutdown()
