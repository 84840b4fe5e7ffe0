"""The spill area keeps the spool disk's floor: checks before each stretch written,
waits of readers while others hold spill files, and the floor a reload changes.
The disk's free space is stood in for (the loop-mounted disk test in
`tests/reliability/test_disk_faults.py` runs the real thing)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.retrieval.engine import Retriever
from gateway.spill import CHECK_BYTES, SpillArea, SpillFull

MiB = 1024 * 1024


class Disk:
    """Free space that shrinks as the area's files grow."""

    def __init__(self, area: SpillArea, free: int) -> None:
        self.area, self.free = area, free

    def __call__(self) -> int:
        self.area.directory.mkdir(parents=True, exist_ok=True)
        return self.free - sum(p.stat().st_size for p in self.area.directory.iterdir())


def area_with(tmp_path: Path, free: int, floor: int) -> SpillArea:
    area = SpillArea(tmp_path / "retrieve", floor)
    area._free = Disk(area, free)  # type: ignore[method-assign]
    return area


def test_a_writer_stops_before_the_stretch_that_would_cross_the_floor(tmp_path: Path) -> None:
    area = area_with(tmp_path, 20 * MiB, 8 * MiB)
    writer = area.writer(".part")
    with pytest.raises(SpillFull) as caught:
        for _ in range(100):
            writer.write(b"\0" * (MiB // 2))
            writer.fh.flush()
    assert "too close to the 8 MiB kept for C-STOREs (spool.min_free_mb)" in str(caught.value)
    written = writer.fh.tell()
    assert 20 * MiB - written >= 8 * MiB and written >= 8 * MiB  # stopped at the floor, not before its last stretch
    writer.discard()
    assert list(area.directory.iterdir()) == []


def test_a_write_larger_than_a_stretch_is_checked_whole(tmp_path: Path) -> None:
    area = area_with(tmp_path, 20 * MiB, 8 * MiB)
    with pytest.raises(SpillFull), area.writer(".wado") as writer:
        writer.write(b"\0" * (16 * MiB))
    assert list(area.directory.iterdir()) == []  # deleted on the way out
    with area.writer(".wado") as writer:
        writer.write(b"\0" * (8 * MiB))
    assert writer.path.stat().st_size == 8 * MiB


def test_no_file_is_opened_within_a_stretch_of_the_floor(tmp_path: Path) -> None:
    area = area_with(tmp_path, 8 * MiB + CHECK_BYTES - 1, 8 * MiB)
    assert area.near_floor()
    with pytest.raises(SpillFull):
        area.writer(".part")
    assert list(area.directory.iterdir()) == []


def test_a_reader_waits_only_while_others_hold_spill_files(tmp_path: Path) -> None:
    """Near the floor with a spill file held, `room` waits until it is deleted; with
    nothing held (nothing to wait for), or when ``may_wait`` says its turn has come,
    it returns at once."""
    area = area_with(tmp_path, 8 * MiB + CHECK_BYTES - 1, 8 * MiB)

    async def scenario() -> list[str]:
        events: list[str] = []
        await asyncio.wait_for(area.room(), 1)  # nothing held
        held = area.new_file(".part")
        held.write_bytes(b"\0")
        await asyncio.wait_for(area.room(lambda: False), 1)  # its turn

        async def release() -> None:
            await asyncio.sleep(0.5)
            events.append("released")
            held.unlink()

        releasing = asyncio.create_task(release())
        await asyncio.wait_for(area.room(), 5)
        events.append("room")
        await releasing
        return events

    assert asyncio.run(scenario()) == ["released", "room"]


def test_a_reload_moves_the_retrievers_floor(tmp_path: Path) -> None:
    (tmp_path / "gateway.toml").write_text(
        f'[dimse]\nae_title = "GW"\nport = 11112\n[spool]\ndirectory = "{tmp_path / "spool"}"\nmin_free_mb = 100\n'
        '[upstream]\nurl = "http://127.0.0.1:9/dicom-web"\n'
    )
    config = load_config(tmp_path / "gateway.toml")
    retriever = Retriever(config, upstream=None)  # type: ignore[arg-type]
    try:
        assert retriever.spill_area.min_free == 100 * MiB
        retriever.config = dataclasses.replace(config, spool=dataclasses.replace(config.spool, min_free_mb=7))
        assert retriever.spill_area.min_free == 7 * MiB
    finally:
        retriever.close()
