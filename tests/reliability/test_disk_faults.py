"""Disk faults: a full spool disk, the facade cache on a full disk, two daemons on one
spool, and the durability order of an acknowledgement proven on the wire (strace),
which a SIGKILL test cannot see because the page cache survives a killed process."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread

from gateway.spill import LOOK_SECONDS, SpillArea
from gateway.spool.record import PREAMBLE, RECORD_MAGIC, parse
from gateway.upstream.base import Frame
from gateway.web.cache import FacadeCache
from tests.integration.test_move_retrieve import MoveResult, parse_move, peers
from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import REPO, Gateway
from tests.support.dcmtk import StoreSCP, movescu
from tests.support.orthanc import build_multipart_related
from tests.support.ports import free_port, port_is_open, wait_until
from tests.support.pyscu import send_files
from tests.support.synth import ct_series

MiB = 2**20
SUCCESS = "Success"


# ---- a small real file system ---------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB ext4 file system on a loop device (sparse image, no reserved blocks so
    root fills it like anyone else), unmounted after the test even when it failed."""
    if os.geteuid() != 0:
        pytest.skip("a loop mount needs root")
    image = tmp_path / "small.img"
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    with open(image, "wb") as fh:
        fh.truncate(64 * MiB)
    subprocess.run(["/usr/sbin/mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    subprocess.run(["/usr/bin/mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["/usr/bin/umount", str(mountpoint)], check=False).returncode != 0:
            # Still busy (a process the test started is dying): detach lazily.
            subprocess.run(["/usr/bin/umount", "-l", str(mountpoint)], check=False)


def fill(path: Path, leave_free: int) -> Path:
    """Allocate a filler file so that only ``leave_free`` bytes stay free on its file system."""
    size = shutil.disk_usage(path.parent).free - leave_free
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return path


def fill_completely(path: Path) -> Path:
    """Write zeros into ``path`` until its file system has no block left."""
    with open(path, "wb", buffering=0) as fh:
        for chunk in (MiB, 4096):
            try:
                while True:
                    fh.write(b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return path


def storescu_responses(output: str) -> list[tuple[str, str | None]]:
    """(file, response status text or None) for every file storescu -v started sending."""
    sent: list[tuple[str, str | None]] = []
    for line in output.splitlines():
        if m := re.search(r"Sending file: (.+)$", line):
            sent.append((m.group(1).strip(), None))
        elif (m := re.search(r"Received Store Response \((.+)\)", line)) and sent and sent[-1][1] is None:
            sent[-1] = (sent[-1][0], m.group(1))
    return sent


def uid_of(path: str | Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def spool_counts(gw: Gateway) -> dict[str, int]:
    """Spool counts from the CLI, which reads the spool while the daemon runs (its
    /healthz would wait on a stopped archive)."""
    status = gw.cli("spool", "status", "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["counts"]


def assert_no_dropped_association(log: str) -> None:
    assert not re.search(r"association from \S+ failed", log), log[-3000:]
    assert "internal error" not in log, log[-3000:]


# ---- 5: object subdirectories exist before anything is acknowledged ----------------------


def test_object_subdirectories_exist_after_start(gateway) -> None:
    gw = gateway()
    buckets = {f"{n:02x}" for n in range(256)}
    for objects in (gw.spool_dir / "objects", gw.spool_dir / "archive" / "objects"):
        missing = buckets - {p.name for p in objects.iterdir() if p.is_dir()}
        assert not missing, f"{objects}: {len(missing)} of 256 subdirectories missing"


# ---- 6: two daemons on one spool --------------------------------------------------------


@pytest.mark.slow
def test_second_daemon_on_the_same_spool_exits_and_touches_nothing(tmp_path: Path, orthanc, gateway) -> None:
    first = gateway(upstream_url=orthanc.dicomweb_url)
    files = ct_series(tmp_path / "ct", 5, rows=64, columns=64)
    os.kill(orthanc.pid, signal.SIGSTOP)  # the archive hangs: the batch stays 'sending'
    try:
        result = dcmtk.storescu(first.port, files, first.ae_title)
        assert result.returncode == 0, result.stdout + result.stderr
        wait_until(lambda: spool_counts(first)["sending"] == 5, 30, 0.2, "batch never claimed")
        in_flight = first.spool_dir / "incoming" / "in-flight.part"
        in_flight.write_bytes(b"half of a data set still arriving")

        second = Gateway(tmp_path / "second", upstream_url=orthanc.dicomweb_url, spool_dir=first.spool_dir)
        try:
            run = subprocess.run(
                [sys.executable, "-m", "gateway", "run", "--config", str(second.config_path)],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=20,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("a second daemon on the same spool kept running")
        assert run.returncode != 0
        assert str(first.spool_dir) in run.stderr and f"pid {first.proc.pid}" in run.stderr, run.stderr
        assert not port_is_open("127.0.0.1", second.port)
        assert in_flight.read_bytes() == b"half of a data set still arriving"
        assert spool_counts(first)["sending"] == 5
        assert first.running
    finally:
        os.kill(orthanc.pid, signal.SIGCONT)
    in_flight.unlink()
    first.wait_counts(delivered=5, timeout=90)
    assert {uid_of(f) for f in files} <= orthanc.sop_instance_uids()
    assert first.cli("spool", "retry", "--dead").returncode == 0  # writes while the daemon runs


# ---- 8: a full spool disk ---------------------------------------------------------------


def above_the_floor(tmp_path: Path, small_fs: Path, smalls: int) -> tuple[Gateway, Path, list[Path]]:
    """A gateway spooling to ``small_fs`` with a 16 MiB floor and 32 MiB left free; a
    40 MiB instance (more than is free) and ``smalls`` small ones."""
    gw = Gateway(tmp_path / "gw", spool_dir=small_fs / "spool", spool={"min_free_mb": 16}).start()
    fill(small_fs / "filler", 32 * MiB)
    big = ct_series(tmp_path / "big", 1, frames=80)[0]
    return gw, big, ct_series(tmp_path / "small", smalls, rows=64, columns=64)


def test_space_floor_is_checked_before_and_during_receipt(tmp_path: Path, small_fs: Path) -> None:
    """An instance larger than the free space crosses the floor mid-receipt: 0xA700,
    and the association goes on to store the next one; below the floor at the
    C-STORE-RQ nothing is written at all."""
    gw, big, small = above_the_floor(tmp_path, small_fs, 2)
    try:
        assert send_files(gw.port, [big, small[0]], gw.ae_title) == [0xA700, 0x0000]
        assert "below the floor" in gw.log()
        assert not any((gw.spool_dir / "incoming").iterdir())

        fill(small_fs / "filler2", 8 * MiB)
        assert send_files(gw.port, [small[1]], gw.ae_title) == [0xA700]
        assert gw.running
        assert_no_dropped_association(gw.log())
        gw.wait_counts(delivered=1, timeout=30)
    finally:
        gw.kill()


def test_a_stow_body_larger_than_the_free_space_is_refused_at_the_floor(tmp_path: Path, small_fs: Path) -> None:
    """A STOW-RS body crosses the floor mid-body, as a C-STORE can: the instance before
    it is stored, the one in progress dropped, the rest not read, and the client told
    503 with Retry-After, so it sends again. Before, the body filled the disk to its
    last block (every C-STORE arriving meanwhile refused) and was answered 400, "the
    request body ended early"."""
    gw, big, small = above_the_floor(tmp_path, small_fs, 3)
    try:
        content_type, body = build_multipart_related([small[0].read_bytes(), big.read_bytes(), small[1].read_bytes()])
        (tmp_path / "body").write_bytes(body)
        answer = curl(f"{gw.web_url}/dicom-web/studies", "-X", "POST", "--data-binary", f"@{tmp_path / 'body'}",
                      "-H", f"Content-Type: {content_type}", "-H", "Accept: application/dicom+json")
        assert answer.status == 503 and answer.headers.get("retry-after") == "60", answer.body
        assert "body refused after 1 stored instance(s): spool free space" in gw.log()
        gw.wait_counts(delivered=1, timeout=30)
        assert shutil.disk_usage(small_fs).free > 16 * MiB  # the dropped part's file is gone
        assert not any((gw.spool_dir / "incoming").iterdir())
        assert send_files(gw.port, [small[2]], gw.ae_title) == [0x0000]  # the spool takes instances again
        gw.wait_counts(delivered=2, timeout=30)
    finally:
        gw.kill()


def cached_frames(cache: FacadeCache, asked: list[int]) -> Callable[[list[int]], list[bytes]]:
    """Frames of one instance through ``cache``, from an archive that answers frame n
    with 300 KB of byte n and appends n to ``asked`` each time it is asked."""

    async def archive(numbers: list[int]) -> AsyncIterator[Frame]:
        for n in numbers:
            asked.append(n)
            yield Frame(n, bytes([n]) * 300_000, "1.2.840.10008.1.2.1")

    async def frames(numbers: list[int]) -> list[bytes]:
        return [f.data async for f in cache.frames("1.2.3", "1.2.3.4", "1.2.3.4.5", numbers, archive)]

    return lambda numbers: asyncio.run(frames(numbers))


def test_the_facade_cache_on_a_full_disk_serves_without_keeping(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no block left, the facade cache cannot write: every frame is still served
    (from the archive, asked again each time), a warning says why, nothing is counted;
    once space is back, frames are kept again."""
    cache = FacadeCache(small_fs / "cache", max_bytes=16 * MiB, metadata_seconds=60)
    asked: list[int] = []
    frames = cached_frames(cache, asked)

    filler = fill_completely(small_fs / "filler")
    assert frames([1, 2]) == [bytes([1]) * 300_000, bytes([2]) * 300_000]
    assert frames([1, 2]) == [bytes([1]) * 300_000, bytes([2]) * 300_000]
    assert asked == [1, 2, 1, 2] and cache.bytes == 0 and not cache.index
    assert "facade cache: cannot write an entry (No space left on device)" in caplog.text
    filler.unlink()
    frames([1, 2])
    frames([1, 2])
    assert asked == [1, 2, 1, 2, 1, 2] and cache.bytes == 600_000


def test_the_facade_cache_on_a_disk_smaller_than_its_bound_keeps_working(
    small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``http.cache.max_mb`` above what ``http.cache.directory``'s own disk holds: a
    write that meets ENOSPC gives back the segment it wrote into and the oldest one,
    so the next frames are kept again, and the warning comes at most ten times a
    minute. Before, the segment's end went on counting bytes never written, every
    later write failed with a WARNING each, and nothing new was kept until the
    uncounted bytes reached the bound."""
    filler = fill(small_fs / "filler", 5 * MiB)
    cache = FacadeCache(small_fs / "cache", max_bytes=256 * MiB, metadata_seconds=60)  # segments of 16 MiB
    asked: list[int] = []
    frames = cached_frames(cache, asked)
    caplog.set_level(logging.WARNING, logger="gateway.web")
    for n in range(1, 61):  # 18 MB through 5 MiB
        assert frames([n]) == [bytes([n]) * 300_000]
    assert cache.bytes > 0 and cache.disk_bytes <= 5 * MiB
    asked.clear()
    assert frames([60]) == [bytes([60]) * 300_000] and asked == []  # the last one was kept
    failures = [r for r in caplog.records if "cannot write an entry (No space left on device)" in r.getMessage()]
    assert 1 <= len(failures) <= 10
    filler.unlink()


def test_the_facade_cache_on_the_spool_disk_keeps_its_floor(small_fs: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The cache on the spool's disk (its default place) keeps nothing new within a
    spill stretch of ``spool.min_free_mb`` and gives its oldest segment back at each
    write it skips; frames are still served. Before, it kept writing down to ENOSPC."""
    cache = FacadeCache(small_fs / "cache", max_bytes=16 * MiB, metadata_seconds=60)
    cache.floor = SpillArea(small_fs / "retrieve", 16 * MiB)
    asked: list[int] = []
    frames = cached_frames(cache, asked)

    frames([1, 2])
    assert cache.bytes == 600_000
    filler = fill(small_fs / "filler", 18 * MiB)
    time.sleep(LOOK_SECONDS)  # the cache's last look at the free space (before the filler) holds that long
    assert frames([3]) == [bytes([3]) * 300_000]
    assert cache.bytes == 0 and not list((small_fs / "cache").iterdir())
    assert frames([1]) == [bytes([1]) * 300_000]
    assert asked == [1, 2, 3, 1]
    assert "facade cache: nothing kept, and its oldest entries dropped: the spool's disk is near spool.min_free_mb" in caplog.text
    filler.unlink()
    frames([3])
    assert cache.bytes == 300_000


@pytest.mark.slow
def test_full_disk_answers_every_store_and_delivers_every_ack(tmp_path: Path, small_fs: Path, orthanc) -> None:
    """No floor (min_free_mb = 0): the real ENOSPC and SQLITE_FULL paths. A batch is
    on its way to a hanging archive; several associations send more than fits; the
    disk is then filled to the last block and the archive answers, so recording that
    delivery fails too. Every C-STORE is answered, the daemon stays up, and once space
    returns everything acknowledged is delivered and nothing stays 'sending'."""
    gw = Gateway(
        tmp_path / "gw",
        upstream_url=orthanc.dicomweb_url,
        spool_dir=small_fs / "spool",
        spool={"min_free_mb": 0},
    )
    first = ct_series(tmp_path / "first", 8, rows=64, columns=64)
    series = [ct_series(tmp_path / f"series{n}", 20) for n in range(3)]  # 3 x 20 x 512 KiB
    late = ct_series(tmp_path / "late", 2, rows=64, columns=64)
    try:
        gw.start()
        os.kill(orthanc.pid, signal.SIGSTOP)  # the archive hangs: a batch stays 'sending'
        try:
            result = dcmtk.storescu(gw.port, first, gw.ae_title)
            assert result.returncode == 0, result.stdout + result.stderr
            wait_until(lambda: spool_counts(gw)["sending"] == 8, 30, 0.2, "batch never claimed")

            fillers = [fill(small_fs / "filler", 18 * MiB)]
            procs = [
                subprocess.Popen(
                    ["/usr/bin/storescu", "-v", "-nh", "-aet", f"MOD{n}", "-aec", gw.ae_title]
                    + ["127.0.0.1", str(gw.port), *map(str, files)],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=dcmtk.dcmtk_env(),
                )
                for n, files in enumerate(series)
            ]
            outputs = [p.communicate(timeout=180)[0] for p in procs]
            fillers.append(fill_completely(small_fs / "filler-last-block"))
        finally:
            os.kill(orthanc.pid, signal.SIGCONT)
        acked = [str(f) for f in first]
        refused = 0
        for proc, output, files in zip(procs, outputs, series):
            responses = storescu_responses(output)
            assert proc.returncode == 0 and len(responses) == len(files), output[-3000:]
            for name, status in responses:
                assert status is not None, f"no response for {name}:\n{output[-3000:]}"
                assert status == SUCCESS or "OutOfResources" in status.replace(" ", ""), status
                if status == SUCCESS:
                    acked.append(name)
                else:
                    refused += 1
        assert refused > 0, "the disk never filled"
        assert len(acked) > len(first), "nothing of the burst was acknowledged"
        # The archive now takes the hung batch; the full spool cannot record that yet.
        wait_until(lambda: orthanc.instance_count() >= 8, 60, 0.5, "the archive never got the hung batch")
        assert send_files(gw.port, [late[0]], gw.ae_title) == [0xA700]
        assert gw.running
        assert_no_dropped_association(gw.log())

        for filler in fillers:
            filler.unlink()
        assert send_files(gw.port, [late[1]], gw.ae_title) == [0x0000]
        expected = {uid_of(f) for f in acked} | {uid_of(late[1])}
        wait_until(lambda: expected <= orthanc.sop_instance_uids(), 120, 0.5, "acknowledged instances missing")
        counts = gw.wait_counts(delivered=len(expected), timeout=60)
        assert counts["sending"] == counts["queued"] == counts["failed"] == counts["dead"] == 0, counts
        # Nothing refused left a file behind, half-received or whole: every spool file
        # is a record of an acknowledged instance, or a blank of the reserve.
        assert not any((gw.spool_dir / "incoming").iterdir())
        kinds = [parse(p.read_bytes()[:PREAMBLE]).kind for p in (gw.spool_dir / "objects").glob("*/*.dcm")]
        assert kinds.count("record") == len(expected) and len(kinds) - kinds.count("blank") == len(expected)
        assert gw.running
        assert_no_dropped_association(gw.log())
    finally:
        gw.kill()


# ---- a retrieval's spill files and the floor ----------------------------------------------


def test_a_move_reads_ahead_only_down_to_the_floor(tmp_path: Path, small_fs: Path, orthanc) -> None:
    """A C-MOVE of 40 x 512 KiB instances (20 MiB) over DICOMweb, every one spilled to
    the spool's disk (``retrieve.spill_mb = 0.1``), towards a destination frozen at
    first (SIGSTOP), with 28 MiB free and a 16 MiB floor. The read-ahead stops above
    the floor and goes on as the destination takes instances: all 40 arrive, the free
    space never falls below the floor, and a modality's C-STORE in the meantime is
    accepted. Before, the read-ahead spilled all 40 (down to 8 MiB free), and that
    C-STORE was refused. Then, with the disk already near the floor and nothing held
    to wait for, a move fails each instance at once, naming the floor, and writes
    nothing; the facade answers a study retrieve 503 with Retry-After."""
    paths = ct_series(tmp_path / "study", 40)
    orthanc.upload(paths)
    study = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    scp = StoreSCP(output_dir=tmp_path / "dest").start()
    gw = Gateway(
        tmp_path / "gw", upstream_url=orthanc.dicomweb_url, spool_dir=small_fs / "spool",
        spool={"min_free_mb": 16, "reserve_mb": 0},
        extra=peers(("STORESCP", scp.port)) + "\n[retrieve]\nspill_mb = 0.1\n",
    ).start()
    small = ct_series(tmp_path / "small", 1, rows=64, columns=64)
    lowest = [shutil.disk_usage(small_fs).free]
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            lowest[0] = min(lowest[0], shutil.disk_usage(small_fs).free)
            time.sleep(0.002)

    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study}
    moved: list[MoveResult] = []
    mover = threading.Thread(target=lambda: moved.append(
        parse_move(movescu(gw.port, gw.ae_title, "STORESCP", keys, extra_args=["-v", "-d"], timeout=120))
    ))
    watcher = threading.Thread(target=watch)
    try:
        fill(small_fs / "filler", 28 * MiB)
        lowest[0] = shutil.disk_usage(small_fs).free
        watcher.start()
        scp.pause()
        try:
            mover.start()
            spill = gw.spool_dir / "retrieve"
            wait_until(lambda: len(list(spill.iterdir())) >= 8, 30, 0.02, "nothing was read ahead")
            time.sleep(2.0)  # the read-ahead goes as far as it will
            held = len(list(spill.iterdir()))
            assert send_files(gw.port, small, gw.ae_title) == [0x0000]
        finally:
            scp.resume()
        mover.join(150)
        (result,) = moved
        assert (result.status, result.completed, result.failed) == (0, 40, 0), result.output[-3000:]
        assert 8 <= held < 40
        assert "reading ahead paused while the spool's disk is near spool.min_free_mb" in gw.log()
        assert lowest[0] >= 16 * MiB, f"free space fell to {lowest[0] / MiB:.1f} MiB"
        assert len(scp.wait_for_files(40)) == 40
        assert list(spill.iterdir()) == []

        fill(small_fs / "filler2", 18 * MiB)  # less than a spill file's 4 MiB above the floor
        failed = parse_move(movescu(gw.port, gw.ae_title, "STORESCP", keys, extra_args=["-v", "-d"], timeout=60))
        assert (failed.completed, failed.failed) == (0, 40), failed.output[-3000:]
        assert "not spilled to disk: the spool's disk has" in gw.log()
        assert "MiB kept for C-STOREs (spool.min_free_mb)" in gw.log()
        # The facade's study retrieve alike: 503, to be asked again.
        answer = curl(f"{gw.web_url}/dicom-web/studies/{study}", "-H", 'Accept: multipart/related; type="application/dicom"')
        assert answer.status == 503 and answer.headers.get("retry-after") == "30", answer.body
        assert "answered 503: not spilled to disk" in gw.log()
        assert shutil.disk_usage(small_fs).free >= 17 * MiB and list(spill.iterdir()) == []
        assert "internal error" not in gw.log() and "Traceback" not in gw.log()
    finally:
        watching.set()
        if watcher.is_alive():
            watcher.join()
        gw.kill()
        scp.stop()


# ---- a damaged spool database ----------------------------------------------------------


def test_a_damaged_spool_database_stops_the_start_and_says_how_to_recover(tmp_path: Path) -> None:
    """A spool database whose file is damaged (its header overwritten) is not started
    on: one ERROR line says the instances are safe in their records and how to get
    them back, with no traceback. Done as it says (the database moved aside), start-up
    adopts every record and the archive holds them all. Before, the daemon died at
    start with sqlite3's traceback, and so did every admin command."""
    gw = Gateway(tmp_path / "gw").start()
    paths = ct_series(tmp_path / "ct", 3, rows=64, columns=64)
    assert dcmtk.storescu(gw.port, paths, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=3, timeout=30)
    assert gw.stop() == 0
    database = gw.spool_dir / "spool.sqlite"
    with open(database, "r+b") as fh:
        fh.write(b"not a database, not at all")
    run = gw.cli("run")
    said = run.stdout + run.stderr
    assert run.returncode == 1, said
    assert f"cannot start: the spool database {database} cannot be read (file is not a database)" in said
    assert "move spool.sqlite (and any spool.sqlite-wal, spool.sqlite-shm) aside and start again" in said
    assert "Traceback" not in said
    status = gw.cli("spool", "status")  # the admin commands say the same
    assert status.returncode == 1 and "cannot be read (file is not a database)" in status.stderr, status.stderr
    assert "Traceback" not in status.stderr

    for path in gw.spool_dir.glob("spool.sqlite*"):
        path.rename(path.with_name(path.name + ".damaged"))
    gw.start()
    try:
        wait_until(lambda: "adopted 3 spooled file(s) whose rows were lost" in gw.log(), 30, 0.1, "not adopted")
        gw.wait_counts(delivered=3, timeout=30)
        study = dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID
        found = curl(f"{gw.web_url}/dicom-web/studies/{study}/instances", "-H", "Accept: application/dicom+json")
        assert found.status == 200 and {o["00080018"]["Value"][0] for o in json.loads(found.body)} == {uid_of(p) for p in paths}
    finally:
        gw.kill()


# ---- 12: the durability order of every acknowledgement, on the wire ----------------------


@dataclass
class Call:
    start: int  # line index where the call was entered
    end: int  # line index where it returned
    text: str  # "name(args) = result", unfinished/resumed halves joined


def read_trace(path: Path) -> list[Call]:
    """strace -f output as calls, in the order strace saw their entry and exit."""
    calls: list[Call] = []
    pending: dict[str, tuple[int, str]] = {}
    for index, line in enumerate(path.read_text(errors="replace").splitlines()):
        m = re.match(r"^(?:\[pid\s+)?(\d+)\]?\s+[\d:.]+\s+(.*)$", line)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (index, rest[: -len("<unfinished ...>")].rstrip())
        elif r := re.match(r"^<\.\.\. \w+ resumed>\s?(.*)$", rest):
            start, head = pending.pop(pid, (index, ""))
            calls.append(Call(start, index, head + r.group(1)))
        else:
            calls.append(Call(index, index, rest))
    return calls


def unescape(text: str) -> bytes:
    """A string as strace -x prints it back to bytes."""
    simple = {"n": b"\n", "t": b"\t", "r": b"\r", "v": b"\v", "f": b"\f", "\\": b"\\", '"': b'"'}
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "\\":
            if text[i + 1] == "x":
                out.append(int(text[i + 2 : i + 4], 16))
                i += 4
                continue
            out += simple[text[i + 1]]
            i += 2
            continue
        out += text[i].encode("latin-1")
        i += 1
    return bytes(out)


def command_elements(data: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set, by element number."""
    elements: dict[int, bytes] = {}
    pos = 0
    while pos + 8 <= len(data):
        element = int.from_bytes(data[pos + 2 : pos + 4], "little")
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        elements[element] = data[pos + 8 : pos + 8 + length]
        pos += 8 + length
    return elements


def store_responses(buffer: bytes) -> Iterator[tuple[str, int]]:
    """(Affected SOP Instance UID, status) of each C-STORE-RSP command in P-DATA-TF PDUs."""
    pos = 0
    while pos + 6 <= len(buffer):
        pdu_type, length = buffer[pos], int.from_bytes(buffer[pos + 2 : pos + 6], "big")
        body, pos = buffer[pos + 6 : pos + 6 + length], pos + 6 + length
        if pdu_type != 0x04:
            continue
        item = 0
        while item + 6 <= len(body):
            item_length = int.from_bytes(body[item : item + 4], "big")
            control, fragment = body[item + 5], body[item + 6 : item + 4 + item_length]
            item += 4 + item_length
            if control & 0x03 != 0x03:
                continue  # a data set, or the start of a longer command
            values = command_elements(fragment)
            if int.from_bytes(values.get(0x0100, b""), "little") == 0x8001:
                uid = values[0x1000].rstrip(b"\x00 ").decode("ascii")
                yield uid, int.from_bytes(values[0x0900], "little")


def fsynced_paths(calls: list[Call]) -> list[tuple[Call, str]]:
    """Successful fsync/fdatasync calls with the path of their fd (strace -y)."""
    found = []
    for call in calls:
        if m := re.match(r"^f(?:data)?sync\(\d+<(.+)>\) += 0$", call.text):
            found.append((call, m.group(1)))
    return found


def pwrites(calls: list[Call]) -> dict[str, list[tuple[Call, int, bytes]]]:
    """Successful pwrite64 calls by the path of their fd: (call, file offset, the
    first bytes written)."""
    found: dict[str, list[tuple[Call, int, bytes]]] = {}
    for call in calls:
        if m := re.match(r'^pwrite64\(\d+<(.+?)>, "((?:[^"\\]|\\.)*)"(?:\.\.\.)?, \d+, (\d+)\) += \d+$', call.text):
            found.setdefault(m.group(1), []).append((call, int(m.group(3)), unescape(m.group(2))))
    return found


def created_paths(calls: list[Call]) -> dict[str, Call]:
    """Files created (O_CREAT) by path."""
    found = {}
    for call in calls:
        if m := re.match(r'^openat\(\S+, "(.+?)", [^)]*O_CREAT[^)]*\) += \d+', call.text):
            found[m.group(1)] = call
    return found


@pytest.mark.parametrize("reserve_mb", [64, 0], ids=["into-blanks", "new-files"])
def test_every_success_follows_the_record_and_directory_sync(tmp_path: Path, reserve_mb: int) -> None:
    """The daemon runs under strace: every C-STORE-RSP with Success that it writes on
    the association's socket comes after (1) every write of the instance's bytes into
    its spool file and the write of the record's sealed preamble, (2) an fdatasync or
    fsync of that file entered after those writes returned, and (3) an fsync of its
    directory entered after the file was created; and nothing on the acknowledgement
    path creates a directory. With the reserve the files are blanks made beforehand
    (their directory fsync long before); with ``reserve_mb = 0`` each is new. The
    trace is in the order strace saw each call enter and return, across threads, so
    "returned before the response was entered" is a real happens-before."""
    trace = tmp_path / "strace.txt"
    syscalls = "openat,mkdir,mkdirat,fsync,fdatasync,pwrite64,sendto,write,writev"
    strace = ["/usr/bin/strace", "-f", "-tt", "-yy", "-x", "-s", "1024", "-e", f"trace={syscalls}", "-o", str(trace)]
    gw = Gateway(tmp_path / "gw", wrapper=strace, spool={"reserve_mb": reserve_mb})
    files = ct_series(tmp_path / "ct", 20, rows=128, columns=128)
    try:
        gw.start(timeout=90)
        result = dcmtk.storescu(gw.port, files, gw.ae_title)
        assert result.returncode == 0, result.stdout + result.stderr
        gw.wait_counts(delivered=20, timeout=60)
        listing = gw.cli("spool", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        spooled = {row["sop_instance_uid"]: str(gw.spool_dir / row["file"]) for row in json.loads(listing.stdout)}
    finally:
        gw.stop(timeout=60)
    calls = read_trace(trace)

    successes: dict[str, Call] = {}
    for call, sent in socket_writes(calls, gw.port):
        for uid, status in store_responses(sent):
            if status == 0x0000:
                successes.setdefault(uid, call)
    assert set(successes) == {uid_of(f) for f in files} == set(spooled)

    first_store = min(c.start for c in successes.values())
    late_mkdirs = [c.text for c in calls if re.match(r"^mkdir(?:at)?\(", c.text) and c.start > first_store]
    assert not late_mkdirs, f"mkdir on the acknowledgement path: {late_mkdirs[:3]}"

    for uid, response in successes.items():
        problem = record_not_durable(calls, spooled[uid], response)
        assert problem is None, f"{uid}: Success sent before {problem}"


def socket_writes(calls: list[Call], port: int) -> Iterator[tuple[Call, bytes]]:
    """What the daemon wrote on connections to its ``port``, call by call (write and
    sendto carry one buffer, writev several)."""
    on_socket = re.compile(rf"^(sendto|write|writev)\(\d+<TCP:\[127\.0\.0\.1:{port}->[^\]]*\]>, (.*)$")
    string = re.compile(r'"((?:[^"\\]|\\.)*)"')
    for call in calls:
        if m := on_socket.match(call.text):
            if m.group(1) == "writev":
                yield call, b"".join(unescape(s) for s in re.findall(r'iov_base=' + string.pattern, m.group(2)))
            elif s := string.match(m.group(2)):
                yield call, unescape(s.group(1))


def record_not_durable(calls: list[Call], final: str, moment: Call) -> str | None:
    """Why the spool record ``final`` was not durable when ``moment`` was entered: its
    seal not written, its bytes not synced after their last write, or its directory
    entry not synced after its creation; None when it was."""
    writes = [(c, offset, data) for c, offset, data in pwrites(calls).get(final, []) if c.start < moment.start]
    if not any(offset == 0 and data.startswith(RECORD_MAGIC) for _, offset, data in writes):
        return "its record was sealed"
    last_write = max(c.end for c, _, _ in writes)
    fsyncs = fsynced_paths(calls)
    if not any(path == final and last_write < c.start and c.end < moment.start for c, path in fsyncs):
        return "its bytes were synced"
    creation = created_paths(calls)[final]
    directory = str(Path(final).parent)
    if not any(path == directory and creation.end < c.start and c.end < moment.start for c, path in fsyncs):
        return "its directory entry was synced"
    return None


def test_a_spool_disk_gone_read_only_refuses_stores_and_says_so_once(tmp_path: Path, small_fs: Path) -> None:
    """ext4 turns itself read-only on an error it cannot repair (``errors=remount-ro``,
    provoked here through its ``trigger_fs_error`` knob). A C-STORE is then refused
    with 0xA700 (the modality keeps the instance), /readyz answers 503 naming the
    cause (a load balancer sends modalities to the other node), and the log says so
    once: before, each forwarder worker logged an ERROR every few seconds and the
    reserve a WARNING every five, some 70,000 lines a day until someone came."""
    subprocess.run(["/usr/bin/mount", "-o", "remount,errors=remount-ro", str(small_fs)], check=True)
    device = Path(subprocess.run(
        ["/usr/bin/findmnt", "-n", "-o", "SOURCE", str(small_fs)], capture_output=True, text=True, check=True,
    ).stdout.strip()).name
    # an archive that is not there: the first instances wait in the spool, retried
    gw = Gateway(tmp_path / "gw", spool_dir=small_fs / "spool", upstream_url=f"http://127.0.0.1:{free_port()}/dicom-web").start()
    try:
        first = ct_series(tmp_path / "first", 2, rows=64, columns=64)
        assert dcmtk.storescu(gw.port, first, gw.ae_title).returncode == 0
        wait_until(lambda: "will be retried" in gw.log(), 30, 0.2, "no delivery attempt")
        Path(f"/sys/fs/ext4/{device}/trigger_fs_error").write_text("test\n")
        later = ct_series(tmp_path / "later", 1, rows=64, columns=64)
        result = dcmtk.storescu(gw.port, later, gw.ae_title, extra_args=["-v"])
        assert "Received Store Response (Refused: OutOfResources)" in result.stdout + result.stderr
        ready = curl(f"{gw.web_url}/readyz")
        assert ready.status == 503 and "Read-only file system" in ready.json()["checks"]["spool"]["detail"]
        time.sleep(12)  # the forwarder's and the reserve's retries: several each
        log = gw.log()
        # (the forwarder meets it claiming, or recording what the archive said: once a
        # minute, and each batch whose outcome it holds named once)
        claims, records = log.count("spool database error"), log.count("cannot record the outcome")
        assert claims <= 1 and records <= 2 and claims + records >= 1, log[-3000:]
        assert log.count("could not prepare blank spool files") == 1, log[-3000:]
        assert "spool database writable again" not in log, log[-3000:]  # it is not
    finally:
        gw.kill()
