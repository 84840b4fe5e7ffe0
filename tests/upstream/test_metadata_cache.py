"""The embedded archive's metadata cache, for instances whose metadata its index does
not keep: a series asked again is answered from the JSON kept, equal to the first
answer and a fresh object each time; an instance stored again under the same file
name is read again; the budget holds. And the texts the index keeps: those read from
files are kept, and they go when their instances do."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pydicom

from gateway.upstream.base import StoreItem
from gateway.upstream.local import KEEP_TEXT, LocalUpstream
from gateway.upstream.metadata_cache import MetadataCache
from tests.support.synth import ct_series


async def store(up: LocalUpstream, paths: list[Path], tmp_path: Path) -> None:
    """Each file into the archive, from a copy (the archive links its spool file)."""
    for n, path in enumerate(paths):
        copy = tmp_path / f"{n}.dcm"
        shutil.copy(path, copy)
        ds = pydicom.dcmread(copy, stop_before_pixels=True)
        item = StoreItem(copy, copy.stat().st_size, ds.SOPInstanceUID, ds.SOPClassUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, str(ds.file_meta.TransferSyntaxUID))
        assert [o.kind for o in await up.store_instances(ds.StudyInstanceUID, [item])] == ["delivered"]


def test_the_cache_holds_while_the_stamp_does_and_keeps_to_its_budget() -> None:
    cache = MetadataCache(budget=8000)
    obj = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "X"}]}, "pad": "y" * 400}
    cache.put("a", (1, 2, 3), obj)
    got = cache.get("a", (1, 2, 3))
    assert got == obj and got is not obj
    got["pad"] = "changed"  # a caller's change does not reach the next caller
    assert cache.get("a", (1, 2, 3)) == obj
    assert cache.get("a", (1, 2, 4)) is None and cache.get("b", (1, 2, 3)) is None
    for n in range(40):  # ~450 bytes each: the oldest go
        cache.put(f"n{n}", (n, 0, 0), obj)
    assert cache.held <= 8000 and cache.get("a", (1, 2, 3)) is None and cache.get("n39", (39, 0, 0)) == obj
    cache.put("big", (0, 0, 0), {"pad": "z" * 2000})  # over an eighth of the budget: not kept
    assert cache.get("big", (0, 0, 0)) is None


def test_metadata_asked_again_comes_from_the_cache_until_the_file_changes(tmp_path: Path) -> None:
    paths = ct_series(tmp_path / "ct", 3, rows=32, columns=32)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)

    async def scenario() -> tuple[list, list, list, list, list]:  # type: ignore[type-arg]
        up = LocalUpstream(tmp_path / "spool")
        await up.start()
        try:
            await store(up, paths, tmp_path)
            # The cache serves instances whose metadata the index does not keep (indexed
            # before it did, or too long): their files are read. A text read is kept in
            # the index after the answer, on the index's thread; emptied there again
            # before each read, the index keeps none here.
            def forget() -> None:
                with up._db.conn:
                    up._db.execute("DELETE FROM metadata_texts")

            async def read(*uids: str) -> list:  # type: ignore[type-arg]
                await asyncio.get_running_loop().run_in_executor(up._executor, forget)
                return await up.retrieve_metadata(*uids)

            before = await read(first.StudyInstanceUID, first.SeriesInstanceUID)
            again = await read(first.StudyInstanceUID, first.SeriesInstanceUID)
            # The stored file, written again in place with the same size and times: the
            # cache cannot tell, and answers what it kept (the files never change so).
            [(name, _)] = up._files(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
            stored = up.root / name
            st = os.stat(stored)
            ds = pydicom.dcmread(stored)
            ds.SeriesDescription = "RENAMED"
            changed = tmp_path / "changed.dcm"
            ds.save_as(changed, enforce_file_format=True)
            stored.write_bytes(changed.read_bytes()[: st.st_size].ljust(st.st_size, b"\0"))
            os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns))
            kept = await read(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
            # Replaced (a new file under the same name): read again.
            os.unlink(stored)
            shutil.copy(changed, stored)
            fresh = await read(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
            return before, again, kept, fresh
        finally:
            await up.close()

    before, again, kept, fresh = asyncio.run(scenario())
    assert len(before) == 3 and again == before and again[0] is not before[0]
    assert "0008103E" not in kept[0] or kept[0]["0008103E"].get("Value") != ["RENAMED"]
    assert fresh[0]["0008103E"]["Value"] == ["RENAMED"]


def test_an_archive_indexed_without_metadata_texts_keeps_each_as_its_file_is_first_read(tmp_path: Path) -> None:
    """Rows indexed by a version before the index kept metadata texts: the first
    request reads their files and the index then keeps each text (the same the writer
    keeps), so the next request reads no file; the answers are the same. Each row is
    found by its primary key, not by a scan of the whole index (SQLite's plan)."""
    paths = ct_series(tmp_path / "ct", 3, rows=32, columns=32)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    series = (str(first.StudyInstanceUID), str(first.SeriesInstanceUID))

    async def scenario() -> tuple[list, list, list, list, list]:  # type: ignore[type-arg]
        up = LocalUpstream(tmp_path / "spool")
        await up.start()
        loop = asyncio.get_running_loop()
        try:
            await store(up, paths, tmp_path)

            def texts() -> list:  # type: ignore[type-arg]
                return up._db.execute(
                    "SELECT text FROM instances LEFT JOIN metadata_texts USING (sop_instance_uid) ORDER BY instances.rowid"
                ).fetchall()

            written = await loop.run_in_executor(up._executor, texts)

            def legacy() -> None:
                with up._db.conn:
                    up._db.execute("DELETE FROM metadata_texts")

            await loop.run_in_executor(up._executor, legacy)
            up._metadata = MetadataCache()  # a freshly started daemon's
            from_files = await up.retrieve_metadata_texts(*series)
            kept = await loop.run_in_executor(up._executor, texts)  # after the keeping, queued first
            for name, *_ in up._metadata_rows(*series, None):
                (up.root / name).rename(up.root / (name + ".away"))  # no file to read now
            from_index = await up.retrieve_metadata_texts(*series)
            plan = await loop.run_in_executor(
                up._executor, lambda: up._db.execute("EXPLAIN QUERY PLAN " + KEEP_TEXT, ("", "", "")).fetchall()
            )
            return written, kept, from_files, from_index, [step[3] for step in plan]
        finally:
            await up.close()

    written, kept, from_files, from_index, plan = asyncio.run(scenario())
    assert kept == written and all(text is not None for (text,) in kept)
    assert from_index == from_files and len(from_files) == 3
    assert len(plan) == 1 and plan[0].startswith("SEARCH instances USING INDEX") and "(sop_instance_uid=?)" in plan[0], plan


def test_the_texts_kept_go_with_their_instances(tmp_path: Path) -> None:
    """Deleting an instance, then its study, removes their metadata texts from the
    index with their rows."""
    paths = ct_series(tmp_path / "ct", 3, rows=32, columns=32)
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)

    async def scenario() -> list[int]:
        up = LocalUpstream(tmp_path / "spool")
        await up.start()
        loop = asyncio.get_running_loop()

        def texts() -> int:
            return int(up._db.execute("SELECT count(*) FROM metadata_texts").fetchone()[0])

        try:
            await store(up, paths, tmp_path)
            counts = [await loop.run_in_executor(up._executor, texts)]
            await up.delete_instance(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
            counts.append(await loop.run_in_executor(up._executor, texts))
            await up.delete_study(first.StudyInstanceUID)
            counts.append(await loop.run_in_executor(up._executor, texts))
            return counts
        finally:
            await up.close()

    assert asyncio.run(scenario()) == [3, 2, 0]
