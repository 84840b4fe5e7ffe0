"""C-MOVE paths the main suites leave out: destinations that cannot take the
sub-operations, a PATIENT-level move, and instances spilled to disk on the way.

Orthanc's DICOMweb is the upstream and dcmtk's movescu and storescp the mover and
the destinations, as in `tests.integration.test_move_retrieve`.

Not covered: C-CANCEL on a C-GET. dcmtk 3.6.7's getscu has no ``--cancel`` option
(movescu has; ``test_move_cancel`` covers the shared engine path).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from tests.integration.test_move_retrieve import MoveResult, failed_list, parse_move, peers
from tests.support.compare import assert_same_dataset
from tests.support.daemon import Gateway
from tests.support.dcmtk import StoreSCP, movescu, storescu_for_syntax
from tests.support.orthanc import Orthanc
from tests.support.ports import free_port
from tests.support.synth import ct_series


def uids(paths: list[Path]) -> dict[str, Path]:
    """SOPInstanceUID -> file."""
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}


def for_patient(paths: list[Path], patient_id: str) -> list[Path]:
    """Give the files another PatientID (ct_series uses one for every series)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientID = patient_id
        ds.save_as(path, enforce_file_format=True)
    return paths


# The module's gateway waits this long for a destination's A-ASSOCIATE-AC (default 30 s),
# so the test of a destination that never answers stays short.
ACSE_TIMEOUT = 2


@dataclass
class Env:
    orthanc: Orthanc
    gateway: Gateway
    scp: StoreSCP
    refusing: StoreSCP
    mr_only: StoreSCP
    down_port: int
    series: list[Path]
    patient: list[Path]  # two studies of patient PAT-PATHS


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("paths")
    series = ct_series(root / "series", 20, 32, 32)
    patient = for_patient(ct_series(root / "p1", 7, 32, 32) + ct_series(root / "p2", 5, 32, 32), "PAT-PATHS")
    scp = StoreSCP(output_dir=root / "dest").start()
    refusing = StoreSCP(output_dir=root / "refusing", ae_title="REFUSER", extra_args=["--refuse"]).start()
    # Accepts MR Image Storage only: the association is accepted, every CT context rejected.
    mr_only = StoreSCP(
        output_dir=root / "mr-only", ae_title="MRONLY",
        profile=storescu_for_syntax(ExplicitVRLittleEndian, [MRImageStorage], root / "profiles"),
    ).start()
    orthanc = Orthanc(workdir=root / "orthanc")
    gateway: Gateway | None = None
    down_port = free_port()  # configured, nothing ever listens there
    # Listens but never accepts: the kernel completes the TCP handshake, nobody answers.
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)
    try:
        orthanc.start()
        orthanc.upload(series + patient)
        gateway = Gateway(
            root / "gw",
            upstream_url=orthanc.dicomweb_url,
            extra=peers(
                ("STORESCP", scp.port), ("REFUSER", refusing.port), ("MRONLY", mr_only.port), ("DOWN", down_port),
                ("SILENT", silent.getsockname()[1]),
            ),
            dimse={"acse_timeout": ACSE_TIMEOUT},
        ).start()
        yield Env(orthanc, gateway, scp, refusing, mr_only, down_port, series, patient)
    finally:
        if gateway is not None:
            gateway.kill()
        silent.close()
        for s in (scp, refusing, mr_only):
            s.cleanup()
        orthanc.cleanup()


def move_series(env: Env, destination: str) -> tuple[MoveResult, float]:
    """C-MOVE the 20-instance series to ``destination``; the result and its duration."""
    first = pydicom.dcmread(env.series[0], stop_before_pixels=True)
    keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": str(first.StudyInstanceUID), "SeriesInstanceUID": str(first.SeriesInstanceUID)}
    started = time.monotonic()
    proc = movescu(env.gateway.port, "DICOMGW", destination, keys, extra_args=["-v", "-d"], timeout=30)
    return parse_move(proc), time.monotonic() - started


def assert_all_failed(env: Env, result: MoveResult) -> None:
    """Final status A702 (Refused: Out of Resources - Unable to perform sub-operations,
    PS3.4 C.4.2.1.5), every instance counted failed and listed, none completed."""
    assert result.status == 0xA702, result.output[-3000:]
    assert (result.completed, result.failed, result.warning) == (0, 20, 0), result.output[-3000:]
    assert failed_list(result) == set(uids(env.series)), result.output[-3000:]


def test_move_to_unreachable_destination(env: Env) -> None:
    """A destination known in ``[[dimse.peers]]`` where nothing listens: the move ends
    at once with 0xA702, all 20 failed and listed in FailedSOPInstanceUIDList. Not
    0xA801, which says the AE title is unknown; this one is known, and sub-operations
    were due but none could be performed, which is what A702 means. The gateway logs
    why."""
    result, took = move_series(env, "DOWN")
    assert took < 10, took
    assert_all_failed(env, result)
    assert f"cannot open the receiving association: cannot connect to 127.0.0.1:{env.down_port}" in env.gateway.log()


def test_move_to_destination_never_answering(env: Env) -> None:
    """A destination that takes the TCP connection but never answers the A-ASSOCIATE-RQ
    holds the move for ``dimse.acse_timeout`` only, then it ends as unreachable: 0xA702,
    all failed and listed, the timeout logged."""
    result, took = move_series(env, "SILENT")
    assert ACSE_TIMEOUT <= took < ACSE_TIMEOUT + 8, took
    assert_all_failed(env, result)
    assert "cannot open the receiving association: association negotiation failed" in env.gateway.log()


def test_move_to_destination_rejecting_the_association(env: Env) -> None:
    """A storescp that answers A-ASSOCIATE-RJ to every request: as unreachable, 0xA702
    with every instance failed and listed, and the rejection logged."""
    result, took = move_series(env, "REFUSER")
    assert took < 10, took
    assert_all_failed(env, result)
    assert "cannot open the receiving association: association rejected" in env.gateway.log()
    assert "Refusing Association" in env.refusing.log(), env.refusing.log()[-2000:]
    assert env.refusing.files() == []


def test_move_to_destination_rejecting_the_sop_class(env: Env) -> None:
    """A storescp that takes MR only: the association is accepted but no CT context,
    so no C-STORE can go out; every instance fails (0xA702, all listed), no file
    arrives, and the association is released cleanly."""
    result, took = move_series(env, "MRONLY")
    assert took < 10, took
    assert_all_failed(env, result)
    assert "receiver accepted no presentation context for the SOP class" in env.gateway.log()
    assert env.mr_only.files() == []


def test_move_patient_level(env: Env) -> None:
    """Patient Root, QueryRetrieveLevel PATIENT with a PatientID: both of the patient's
    studies arrive whole and identical, and nothing of another patient; one study
    search made them a STUDY request, so both were read in bulk."""
    before = set(uids(env.scp.files()))
    logged = len(env.gateway.log())
    proc = movescu(
        env.gateway.port, "DICOMGW", "STORESCP", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PAT-PATHS"},
        model="patient", extra_args=["-v", "-d"], timeout=30,
    )
    result = parse_move(proc)
    assert (result.status, result.completed, result.failed, result.warning) == (0, 12, 0, 0), result.output[-3000:]
    assert "12 instances (12 in bulk)" in env.gateway.log()[logged:]
    env.scp.wait_for_files(len(before) + 12)
    received = {uid: p for uid, p in uids(env.scp.files()).items() if uid not in before}
    expected = uids(env.patient)
    assert set(received) == set(expected)
    for uid, path in expected.items():
        assert_same_dataset(path, received[uid])


def test_move_spilled_to_disk(tmp_path: Path) -> None:
    """``retrieve.spill_mb = 0.1`` and 512 KiB images: every instance waits in a file
    under ``<spool>/retrieve`` (watched while the moves run), over the series answer
    (bulk) and over single-instance requests (IMAGE level), and arrives identical;
    afterwards no spill file is left.

    The images are larger than any chunk aiohttp hands out (its buffer pauses reading
    at 128 KiB, a read adds at most 256 KiB), so no part of the series answer can
    arrive whole in one chunk, which the multipart reader keeps in memory whatever
    its size. The destination is frozen (SIGSTOP) while each move starts, so the
    instances read ahead of its association wait in their spill files long enough
    to be seen: a spill file of an instance sent at once lives for well under the
    watcher's poll.
    """
    paths = ct_series(tmp_path / "series", 12, 512, 512)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    scp = StoreSCP(output_dir=tmp_path / "dest").start()
    orthanc = Orthanc(workdir=tmp_path / "orthanc")
    gw: Gateway | None = None
    try:
        orthanc.start()
        orthanc.upload(paths)
        gw = Gateway(
            tmp_path / "gw", upstream_url=orthanc.dicomweb_url,
            extra=peers(("STORESCP", scp.port)) + "\n[retrieve]\nspill_mb = 0.1\n",
        ).start()
        spill_dir = gw.spool_dir / "retrieve"
        seen: set[str] = set()
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                if spill_dir.is_dir():
                    seen.update(p.name for p in spill_dir.iterdir())
                time.sleep(0.002)

        def move_frozen(keys: dict[str, str], timeout: int) -> MoveResult:
            """Move ``keys`` while the destination stays frozen until a new spill
            file has been seen (or 20 s have passed)."""
            before = len(seen)
            moved: list[MoveResult] = []
            scp.pause()
            mover = threading.Thread(target=lambda: moved.append(parse_move(
                movescu(gw.port, "DICOMGW", "STORESCP", keys, extra_args=["-v", "-d"], timeout=timeout)
            )))
            try:
                mover.start()
                deadline = time.monotonic() + 20
                while len(seen) == before and time.monotonic() < deadline:
                    time.sleep(0.01)
            finally:
                scp.resume()
            mover.join()
            (result,) = moved
            return result

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            keys = {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": str(first.StudyInstanceUID), "SeriesInstanceUID": str(first.SeriesInstanceUID)}
            result = move_frozen(keys, 60)
            assert (result.status, result.completed, result.failed) == (0, 12, 0), result.output[-3000:]
            assert "12 instances (12 in bulk)" in gw.log()
            bulk_seen = len(seen)
            keys = {**keys, "QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "\\".join(uids(paths[:4]))}
            result = move_frozen(keys, 30)
            assert (result.status, result.completed, result.failed) == (0, 4, 0), result.output[-3000:]
        finally:
            stop.set()
            watcher.join()
        assert bulk_seen > 0 and len(seen) > bulk_seen, seen
        assert list(spill_dir.iterdir()) == []
        files = scp.wait_for_files(12)
        received = uids(files)
        for uid, path in uids(paths).items():
            assert_same_dataset(path, received[uid])
    finally:
        if gw is not None:
            gw.kill()
        scp.cleanup()
        orthanc.cleanup()
