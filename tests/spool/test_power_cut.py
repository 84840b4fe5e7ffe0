"""A power cut between any two steps of the write path loses no acknowledged instance.

The spool's file operations go through `Disk`; here a recorder takes its place. It
performs each operation for real and also keeps, per file, what the last sync made
durable and the writes since. The test runs a sequence (blanks prepared, instances
received into blanks, into a new file, one growing its blank) and
cuts the power before operation k, for every k. From the record it builds disk images
a power cut could leave behind: each unsynced write kept or lost (sector by sector,
so torn), each directory entry not yet fsynced present or absent, and the spool
database kept as it was or lost entirely (rows are not synced: the records are what
an acknowledgement rests on). Then the spool recovers on each image, and:

* every instance whose C-STORE was acknowledged (its `ingest` returned STORED) is
  queued, and the bytes that a delivery would send are exactly the ones received;
* nothing else is queued unless it is whole (a record sealed just before the cut);
  a torn record is never handed to an upstream.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from gateway.config import SpoolConfig
from gateway.spool.disk import Disk
from gateway.spool.ingest import Verdict, ingest
from gateway.spool.queue import Spool
from gateway.spool.record import PREAMBLE, Sender, crc32
from tests.support.synth import ct_series

SECTOR = 512


class PowerCut(BaseException):
    """Raised instead of the operation the power cut came before; a BaseException so
    no ``except Exception`` of the code under test runs on after the cut."""


@dataclass
class FileModel:
    synced: bytes | None = None  # content the last sync made durable (None: none yet)
    pending: list[tuple[int, bytes]] = field(default_factory=list)  # writes since that sync
    entry_durable: bool = False  # its directory was fsynced after it was created
    unlinked: bool = False
    unlink_durable: bool = False


class RecordingDisk(Disk):
    """A `Disk` that does the real operation and records what it made durable."""

    def __init__(self, cut_at: int | None) -> None:
        self.cut_at = cut_at
        self.ops = 0
        self.files: dict[Path, FileModel] = {}
        self.fds: dict[int, Path] = {}

    def _step(self) -> None:
        if self.cut_at is not None and self.ops >= self.cut_at:
            raise PowerCut()
        self.ops += 1

    def create(self, path: Path) -> int:
        self._step()
        fd = super().create(path)
        self.files[path] = FileModel()
        self.fds[fd] = path
        return fd

    def open(self, path: Path) -> int:
        self._step()
        fd = super().open(path)
        self.fds[fd] = path
        return fd

    def pwrite(self, fd: int, data: bytes | memoryview, offset: int) -> None:
        self._step()
        super().pwrite(fd, data, offset)
        self.files[self.fds[fd]].pending.append((offset, bytes(data)))

    def fdatasync(self, fd: int) -> None:
        self._step()
        super().fdatasync(fd)
        self._synced(self.fds[fd])

    def _synced(self, path: Path) -> None:
        model = self.files[path]
        model.synced, model.pending = path.read_bytes(), []

    def fsync_dir(self, path: Path) -> None:
        self._step()
        super().fsync_dir(path)
        for file, model in self.files.items():
            if file.parent == path:
                model.entry_durable = True
                model.unlink_durable = model.unlinked

    def close(self, fd: int) -> None:
        self._step()
        super().close(fd)
        self.fds.pop(fd, None)

    def unlink(self, path: Path) -> None:
        self._step()
        super().unlink(path)
        if path in self.files:
            self.files[path].unlinked = True

    def image(self, rng: random.Random) -> dict[Path, bytes]:
        """One disk state a power cut now could leave: file -> content."""
        out: dict[Path, bytes] = {}
        for path, model in self.files.items():
            if model.unlink_durable:
                continue
            if not model.entry_durable and rng.random() < 0.5:
                continue  # the new entry never reached the disk
            if model.unlinked and rng.random() < 0.5:
                continue  # the removal did
            content = bytearray(model.synced or b"")
            for offset, data in model.pending:
                for start in range(0, len(data), SECTOR):
                    if rng.random() < 0.5:
                        continue  # this sector of the write was lost
                    at = offset + start
                    piece = data[start : start + SECTOR]
                    if len(content) < at:
                        content.extend(bytes(at - len(content)))
                    content[at : at + len(piece)] = piece
            out[path] = bytes(content)
        return out


@dataclass
class Run:
    acknowledged: dict[str, bytes]  # SOP Instance UID -> the Part 10 bytes after the preamble
    sealed_or_not: dict[str, bytes]  # every instance whose receipt was started


def instances(directory: Path) -> list[bytes]:
    """Three small instances and one larger than a blank, as Part 10 bytes."""
    small = ct_series(directory / "small", 3, 48, 48)
    large = ct_series(directory / "large", 1, 160, 160)
    return [p.read_bytes() for p in small + large]


def run_sequence(root: Path, disk: RecordingDisk, payloads: list[bytes]) -> Run:
    """Blanks, four C-STOREs as the association does them, then a delivery's check."""
    spool = Spool(SpoolConfig(directory=root, min_free_mb=0, reserve_mb=1))
    spool.disk = spool.reserve.disk = disk
    run = Run({}, {})
    try:
        for path in spool.reserve._make(2, 32 * 1024):
            spool.reserve.give_back(path, 32 * 1024)
        for data in payloads:
            uid = _uid(data)
            run.sealed_or_not[uid] = data[PREAMBLE:]
            receipt = spool.receive()
            body = memoryview(data)[PREAMBLE:]
            for start in range(0, len(body), 16384):
                receipt.write(body[start : start + 16384])
            result = ingest(spool, receipt, Sender("MOD"))
            assert result.verdict is Verdict.STORED, result
            run.acknowledged[uid] = data[PREAMBLE:]
        batch = spool.claim(10, 1 << 30)
        assert not spool.check(batch)
    except PowerCut:
        pass
    finally:
        spool.db.close()
    return run


def _uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def recover_image(source: Path, target: Path, image: dict[Path, bytes], keep_db: bool) -> Spool:
    """Lay the image out as a spool directory and recover it. The directories of the
    previous image are kept and only its files removed: making and removing 256
    directories per image was most of this test's time, and recovery makes them anyway."""
    if target.is_dir():
        for root, _dirs, files in os.walk(target):
            for name in files:
                os.unlink(os.path.join(root, name))
    else:
        for n in range(256):
            (target / "objects" / f"{n:02x}").mkdir(parents=True)
    if keep_db:
        for name in os.listdir(source):
            if name.startswith("spool.sqlite"):
                shutil.copy(source / name, target / name)
    for path, content in image.items():
        (target / path.relative_to(source)).write_bytes(content)
    spool = Spool(SpoolConfig(directory=target, min_free_mb=0, reserve_mb=0))
    spool.recover()
    return spool


def delivered_bytes(spool: Spool) -> dict[str, bytes]:
    """What the forwarder would hand to an upstream after recovery: UID -> bytes after
    the preamble, for each instance `check` lets through."""
    out: dict[str, bytes] = {}
    while batch := spool.claim(100, 1 << 30):
        damaged = spool.check(batch)
        for inst in batch:
            if inst.id in damaged:
                continue
            data = inst.path.read_bytes()[: inst.size]
            assert len(data) == inst.size
            out[inst.sop_instance_uid] = data[PREAMBLE:]
    return out


def test_power_cut_before_every_step_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    payloads = instances(tmp_path / "src")
    # How many operations the whole sequence takes, uncut.
    full = RecordingDisk(None)
    complete = run_sequence(tmp_path / "full", full, payloads)
    assert len(complete.acknowledged) == len(payloads)
    total = full.ops
    assert total > 30
    checked = 0
    for cut in range(total + 1):
        source = tmp_path / f"cut{cut}"
        disk = RecordingDisk(cut)
        run = run_sequence(source, disk, payloads)
        for seed in range(4):
            rng = random.Random(cut * 100 + seed)
            image = disk.image(rng)
            for keep_db in (True, False):
                spool = recover_image(source, tmp_path / "image", image, keep_db)
                try:
                    sent = delivered_bytes(spool)
                finally:
                    spool.close()
                where = f"cut before operation {cut}, seed {seed}, database {'kept' if keep_db else 'lost'}"
                for uid, data in run.acknowledged.items():
                    assert sent.get(uid) == data, f"acknowledged {uid} not recovered whole ({where})"
                for uid, data in sent.items():
                    assert data == run.sealed_or_not.get(uid), f"{uid} delivered partial or unknown ({where})"
                checked += 1
        shutil.rmtree(source)
    assert checked == (total + 1) * 8


@pytest.mark.parametrize("flip", [PREAMBLE + 10, -5])
def test_a_record_damaged_after_its_seal_is_never_delivered(tmp_path: Path, flip: int) -> None:
    """Bit rot after the acknowledgement: the checksum catches it before delivery; the
    row goes dead with the reason, the bytes stay for the admin."""
    payloads = instances(tmp_path / "src")[:1]
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0))
    try:
        receipt = spool.receive()
        receipt.write(payloads[0][PREAMBLE:])
        assert ingest(spool, receipt, Sender("MOD")).verdict is Verdict.STORED
        [inst] = spool.claim(10, 1 << 30)
        data = bytearray(inst.path.read_bytes())
        data[flip] ^= 0xFF
        inst.path.write_bytes(bytes(data))
        assert "checksum" in spool.check([inst])[inst.id]
    finally:
        spool.close()


def test_the_record_checksum_is_the_standard_crc32_whichever_library_sums_it() -> None:
    """Records are summed with libdeflate's CRC-32 when imagecodecs has it: it must
    equal zlib's, chunk by chunk from any running value, or records sealed by one
    build would fail verification under another."""
    data = random.Random(7).randbytes(300_000)
    assert crc32 is not zlib.crc32  # the fast one is installed with the test needs
    running_fast = running_zlib = 0
    for start in range(0, len(data), 65_537):
        chunk = memoryview(data)[start : start + 65_537]
        running_fast, running_zlib = crc32(chunk, running_fast), zlib.crc32(chunk, running_zlib)
        assert running_fast == running_zlib
    assert crc32(b"", running_fast) == running_fast
