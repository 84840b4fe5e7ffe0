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
    and reading it while the receiver waits: the files up to the spill size come whole
    (exactly the stored bytes), a trip's files at most WHOLE_PER_BATCH bytes of them;
    the rest come as their path with the head that holds their File Meta."""
    paths = ct_series(tmp_path / "ct", 5, rows=64, columns=64)
    size = paths[0].stat().st_size
    monkeypatch.setattr(local, "WHOLE_PER_BATCH", 3 * size + 10)  # three of five per trip
    got = _store_and_list(tmp_path, paths, spill_bytes=size + 100)
    assert len(got) == 5
    whole = [r for r in got if r.data is not None]
    assert len(whole) == 3
    stored = {p.read_bytes() for p in paths}
    for r in whole:
        assert r.data in stored and r.length == len(r.data) and r.checked
        assert r.read(0, 132)[128:] == b"DICM"
    for r in got:
        if r.data is None:
            assert r.path is not None and r.path.read_bytes() in stored
            assert r.head is not None and 132 <= len(r.head) < size and r.checked

    larger = _store_and_list(tmp_path / "again", paths, spill_bytes=size - 1)
    assert [r.data for r in larger] == [None] * 5  # above the spill size: never in memory
