"""The embedded archive's whole-series answer (`LocalUpstream.iter_instances`): small
files come whole in memory, read ahead on a worker thread, within a bound per trip."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pydicom
import pytest

from gateway.spill import SpillArea
from gateway.upstream import local
from gateway.upstream.base import Retrieved, StoreItem
from gateway.upstream.local import LocalUpstream
from tests.support.synth import ct_series


def _store_and_list(tmp_path: Path, paths: list[Path], spill_bytes: int) -> list[Retrieved]:
    async def run() -> list[Retrieved]:
        up = LocalUpstream(tmp_path / "spool")
        await up.start()
        try:
            first = pydicom.dcmread(paths[0], stop_before_pixels=True)
            study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
            items = []
            for n, path in enumerate(paths):
                copy = tmp_path / f"copy{n}.dcm"
                shutil.copy(path, copy)
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                items.append(StoreItem(copy, copy.stat().st_size, str(ds.SOPInstanceUID), str(ds.SOPClassUID), study, series, ""))
            assert {o.kind for o in await up.store_instances(study, items)} == {"delivered"}
            spill = SpillArea(tmp_path / "spill")
            return [r async for r in up.iter_instances(study, series, spill, spill_bytes)]
        finally:
            await up.close()

    return asyncio.run(run())


def test_small_files_come_whole_and_large_ones_as_their_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sub-operation's sender writes the next instance from memory instead of opening
    and reading it while the receiver waits: files up to the spill size come whole
    (exactly the stored bytes), a trip to the worker thread taking
    at most WHOLE_PER_TRIP bytes of them; larger files come as their path with the head
    that holds their File Meta."""
    paths = ct_series(tmp_path / "ct", 5, rows=64, columns=64)
    # The files differ by a few bytes (their UIDs' lengths): the bounds hold for all.
    smallest, largest = min(p.stat().st_size for p in paths), max(p.stat().st_size for p in paths)
    trips: list[int] = []
    heads = LocalUpstream._heads

    def counted(self: LocalUpstream, files: list[tuple[str, str]], whole_up_to: int) -> tuple[list[Retrieved], int]:
        items, taken = heads(self, files, whole_up_to)
        trips.append(taken)
        return items, taken

    monkeypatch.setattr(LocalUpstream, "_heads", counted)
    monkeypatch.setattr(local, "WHOLE_PER_TRIP", 3 * largest + 10)  # three files a trip
    assert 4 * smallest > 3 * largest + 10
    got = _store_and_list(tmp_path, paths, spill_bytes=largest + 100)
    assert trips == [3, 2]
    stored = sorted(p.read_bytes() for p in paths)
    assert sorted(bytes(r.data or b"") for r in got) == stored
    for r in got:
        assert r.data is not None and r.length == len(r.data) and r.checked
        assert r.read(0, 132)[128:] == b"DICM"

    trips.clear()
    larger = _store_and_list(tmp_path / "again", paths, spill_bytes=smallest - 1)
    assert trips == [5]
    stored_set = set(stored)
    for r in larger:  # above the spill size: never in memory
        assert r.data is None and r.path is not None and r.path.read_bytes() in stored_set
        assert r.head is not None and 132 <= len(r.head) < smallest and r.checked
