"""The reserve of blank spool files, and how start-up sorts what a stop left behind."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

from gateway.config import SpoolConfig
from gateway.fsutil import make_buckets
from gateway.spool.disk import Disk
from gateway.spool.queue import Spool
from gateway.spool.record import BLANK_MAGIC, PREAMBLE, seal
from gateway.spool.reserve import MiB, Reserve
from tests.support.synth import ct_series


def wait_for(predicate, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def reserve(tmp_path: Path, target_mb: int, headroom_mb: int) -> Reserve:
    objects = tmp_path / "objects"
    make_buckets(objects)
    return Reserve(objects, Disk(), target_mb * MiB, lambda: headroom_mb * MiB)


def test_blanks_are_made_ready_and_sized_after_recent_instances(tmp_path: Path) -> None:
    r = reserve(tmp_path, 4, 10_000)
    r.start()
    try:
        wait_for(lambda: r.ready_bytes >= 4 * MiB)
        path, size = r.take()  # type: ignore[misc]
        data = path.read_bytes()
        assert data[:8] == BLANK_MAGIC and len(data) == size == MiB and not any(data[PREAMBLE:])
        r.note(3 * MiB)

        def resized() -> bool:  # taking blanks until one follows the new size
            blank = r.take()
            return blank is not None and blank[1] >= 3 * MiB + PREAMBLE

        wait_for(resized)
    finally:
        r.stop()


def test_blanks_never_take_more_than_a_quarter_of_the_headroom(tmp_path: Path) -> None:
    r = reserve(tmp_path, 64, 8)
    r.start()
    try:
        time.sleep(1.0)
        assert 0 < r.ready_bytes <= 2 * MiB
    finally:
        r.stop()


def test_start_up_reuses_blanks_adopts_records_and_drops_what_was_never_sealed(tmp_path: Path) -> None:
    cfg = SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0)
    spool = Spool(cfg)
    instance = ct_series(tmp_path / "ct", 1, 32, 32)[0].read_bytes()
    sealed = spool.receive()
    sealed.write(instance[PREAMBLE:])
    sealed.seal()
    unsealed = spool.receive()
    unsealed.write(instance[PREAMBLE:])  # the power went before the seal
    unsealed.fd and spool.disk.close(unsealed.fd)
    torn = spool.objects / "ab" / "torn.dcm"
    body = bytearray(instance[PREAMBLE:])
    good_crc = zlib.crc32(body)
    body[len(body) // 2 : len(body) // 2 + 512] = bytes(512)  # a sector that never landed
    torn.write_bytes(seal(len(instance), good_crc) + bytes(body))
    zeros = spool.objects / "cd" / "zeros.dcm"
    zeros.write_bytes(bytes(MiB))  # a blank whose first page never landed
    spool.close()

    spool = Spool(cfg)
    try:
        assert spool.recover() == (0, 1)
        (row,) = spool.list_rows("queued")
        assert spool.directory / row["file"] == sealed.path and row["size"] == len(instance)
        assert spool.reserve.ready_bytes > 0 and spool.reserve.take()[0] == unsealed.path  # type: ignore[index]
        assert not torn.exists() and not zeros.exists()
    finally:
        spool.close()
