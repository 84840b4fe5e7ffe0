"""The embedded archive: instances kept on local disk, indexed in SQLite.

The default upstream, so that a fresh install works with no archive anywhere. Stored
files are hard links to the spool files (same file system, no copy; cut to the
instance where the spool record sat in a longer blank), so purging the
spool never removes archived data. The index holds the attributes C-FIND and QIDO
match on, plus each instance's header as DICOM JSON so any requested key can be
returned, and its whole metadata as the facade answers it (`archive_metadata`).
Instances are stored by the writer process (`archive_writer`); the daemon's own index
access (search, retrieve, delete) happens on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.fsutil import fsync_path, make_buckets
from gateway.model.query import Key
from gateway.model.search import Search
from gateway.part10 import META_HEAD, read_file_meta
from gateway.spill import SpillArea
from gateway.sqlite import Migration, connect, immediate, migrate
from gateway.upstream import archive_metadata
from gateway.upstream.archive_metadata import file_metadata, metadata_text
from gateway.upstream.archive_writer import INDEX, INDEXED, WriterProcess
from gateway.upstream.base import (
    Capabilities,
    Frame,
    Health,
    JsonObject,
    MetadataText,
    Retrieved,
    StoreItem,
    StoreOutcome,
)
from gateway.upstream.errors import NotFound, UpstreamRejected
from gateway.upstream.metadata_cache import MetadataCache
from gateway.upstream.stored_frames import frame_reader, in_batches

log = logging.getLogger("gateway.upstream")

# Files whose heads `LocalUpstream.iter_instances` reads per trip to a worker thread.
HEAD_BATCH = 32
# Bytes read first for a file's head: its File Meta is a few hundred bytes.
SHORT_HEAD = 4096
# Bytes of whole files one trip reads into memory (`_heads`): what a facade answer
# streaming a series holds at once.
WHOLE_PER_TRIP = 4 << 20


def _meta_within(head: bytes) -> bool:
    """Whether ``head`` holds a whole File Meta group and an element header after it,
    so that where the data set starts is known from it alone."""
    try:
        return read_file_meta(head).dataset_offset + 8 <= len(head)
    except ValueError:
        return False


def _v1(db: sqlite_utils.Database) -> None:
    """The index as first shipped; databases from before migrations already have it."""
    if "instances" in db.table_names():
        return
    columns: dict[str, type] = {
        "sop_instance_uid": str,
        "sop_class_uid": str,
        "study_uid": str,
        "series_uid": str,
        "transfer_syntax": str,
        **{col: str for col in INDEXED},
        "file": str,
        "size": int,
        "stored_at": float,
        "metadata": str,
    }
    db.table("instances").create(columns, pk="sop_instance_uid")
    for cols in (["study_uid"], ["series_uid"], ["patient_id"], ["study_date"]):
        db.table("instances").create_index(cols)


def _v2(db: sqlite_utils.Database) -> None:
    """Each instance's metadata text as the facade answers it (`kept_metadata`), so a
    series' metadata is one query: first a column of the instances table, which `_v3`
    moves to a table of its own. Rows from before it have no text: each gets one when
    its file is first read for metadata (`LocalUpstream._keep_texts`), or all at once
    by `dicom-gateway archive reindex`."""
    if "wado_metadata" not in db["instances"].columns_dict:
        db.execute("ALTER TABLE instances ADD COLUMN wado_metadata TEXT")


def _v3(db: sqlite_utils.Database) -> None:
    """The metadata texts in a table of their own, ``metadata_texts``. In the instances
    table they doubled a small header's row, and a search that scans it (a patient's
    name) reads every row: 100,000 instances of 23 header elements took 419 MB
    instead of 145, and such a study-level search 312 ms instead of 168."""
    db.execute(
        "CREATE TABLE IF NOT EXISTS metadata_texts (sop_instance_uid TEXT PRIMARY KEY, text TEXT NOT NULL)"
    )
    if "wado_metadata" in db["instances"].columns_dict:
        db.execute(
            "INSERT OR REPLACE INTO metadata_texts"
            " SELECT sop_instance_uid, wado_metadata FROM instances WHERE wado_metadata IS NOT NULL"
        )
        db.execute("ALTER TABLE instances DROP COLUMN wado_metadata")


MIGRATIONS: list[Migration] = [_v1, _v2, _v3]


# A text read from a file, kept for that instance while its row still names that file
# (the instance was not stored again meanwhile) and no text is kept for it. The row is
# found by its primary key: by ``file``, which has no index, each text kept was a scan
# of the whole table (0.17 s per text on an index of 100,000 instances, the index's
# one thread held 50 s by a 300-instance series).
KEEP_TEXT = (
    "INSERT OR IGNORE INTO metadata_texts (sop_instance_uid, text)"
    " SELECT sop_instance_uid, ? FROM instances WHERE sop_instance_uid = ? AND file = ?"
)


class ArchiveIndexUnreadable(Exception):
    """The embedded archive's index cannot be opened as a database (a damaged file):
    the daemon does not start on it, and says how to rebuild it from the files."""

    def __init__(self, path: Path, reason: sqlite3.DatabaseError) -> None:
        super().__init__(
            f"the embedded archive's index {path} cannot be read ({reason}). The archived instances are "
            f"intact under {path.parent / 'objects'}: rebuild the index from them with "
            "`dicom-gateway archive reindex --config <this config>` (the daemon stopped), then start again"
        )


class LocalUpstream:
    """Archive on local disk under ``<spool>/archive``."""

    kind = "local"
    capabilities = Capabilities()  # everything, delete included; no search limit

    def __init__(self, spool_directory: Path, page_size: int = 1000) -> None:
        """``page_size``: index rows read per step of a search (``find.page_size``), so
        a search streams its answers instead of reading every match first."""
        self.page_size = page_size
        self.root = spool_directory / "archive"
        self.objects = self.root / "objects"
        # Every storage subdirectory is durable before any index row can point into
        # one, so storing never creates a directory (see make_buckets).
        make_buckets(self.objects)
        fsync_path(spool_directory, directory=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-archive")
        self._db = self._executor.submit(self._open).result()
        self._writer = WriterProcess(self.root)
        self._metadata = MetadataCache()

    def _open(self) -> sqlite_utils.Database:
        path = self.root / INDEX
        try:
            db = connect(path)
            migrate(db, MIGRATIONS)
            # one row read, not a count: a million-instance archive starts as fast
            indexed = db.execute("SELECT 1 FROM instances LIMIT 1").fetchone() is not None
        except sqlite3.DatabaseError as exc:
            raise ArchiveIndexUnreadable(path, exc) from None
        if not indexed and self._holds_files():
            log.warning(
                "the embedded archive's index %s is empty, but files are stored under %s: if the index was "
                "lost, stop the daemon and run `dicom-gateway archive reindex`, which indexes them again",
                path, self.objects,
            )
        return db

    def _holds_files(self) -> bool:
        """Whether any instance file lies under ``objects`` (stops at the first)."""
        for bucket in sorted(self.objects.iterdir()):
            if bucket.is_dir() and next(bucket.glob("*.dcm"), None) is not None:
                return True
        return False

    async def start(self) -> None:
        await self._writer.start()

    async def close(self) -> None:
        await self._writer.close()
        self._executor.submit(self._db.close).result()
        self._executor.shutdown(wait=True)

    async def store_instances(
        self, study_uid: str, instances: Sequence[StoreItem]
    ) -> list[StoreOutcome]:
        return await self._writer.store(instances)

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    async def health(self) -> Health:
        loop = asyncio.get_running_loop()
        count = await loop.run_in_executor(self._executor, self._count)
        return Health(True, f"embedded archive, {count} instances")

    # -- search (QIDO-RS semantics over the index) ------------------------------------

    def _search_page(self, level: str, search: Search, after: tuple[Any, ...], limit: int) -> list[tuple[Any, ...]]:
        """The next ``limit`` candidates after the sort key ``after`` (SQL on the
        indexed columns only): each row is the sort key, the header JSON of the
        entity's first instance and, for studies and series, the computed attributes.

        Keyset paging (``WHERE key > after``) rather than OFFSET, so each page costs
        what it returns, not everything before it. The header is returned as text and
        decoded by the caller, one result at a time as it is answered.
        """
        where, args = _prefilter(level, search)
        header = _header_column(level, search)
        if level == "studies":
            sql = (
                f"SELECT g.study_uid, {header}, g.mods, g.classes, g.series, g.instances FROM ("
                "SELECT study_uid, MIN(rowid) AS first, group_concat(DISTINCT modality) AS mods, "
                "group_concat(DISTINCT sop_class_uid) AS classes, COUNT(DISTINCT series_uid) AS series, "
                "COUNT(*) AS instances FROM instances "
                f"WHERE study_uid IN (SELECT study_uid FROM instances WHERE {where}) AND study_uid > ? "
                "GROUP BY study_uid ORDER BY study_uid LIMIT ?"
                ") AS g JOIN instances AS i ON i.rowid = g.first ORDER BY g.study_uid"
            )
        elif level == "series":
            sql = (
                f"SELECT g.study_uid, g.series_uid, {header}, g.instances FROM ("
                "SELECT study_uid, series_uid, MIN(rowid) AS first, COUNT(*) AS instances FROM instances "
                f"WHERE series_uid IN (SELECT series_uid FROM instances WHERE {where}) "
                "AND (study_uid, series_uid) > (?, ?) "
                "GROUP BY series_uid ORDER BY study_uid, series_uid LIMIT ?"
                ") AS g JOIN instances AS i ON i.rowid = g.first ORDER BY g.study_uid, g.series_uid"
            )
        else:
            sql = (
                f"SELECT study_uid, series_uid, rowid, {header} FROM instances AS i WHERE ({where}) "
                "AND (study_uid, series_uid, rowid) > (?, ?, ?) "
                "ORDER BY study_uid, series_uid, rowid LIMIT ?"
            )
        return self._db.execute(sql, [*args, *after, limit]).fetchall()

    async def _search(self, level: str, search: Search) -> AsyncGenerator[JsonObject, None]:
        """Candidates of the prefilter, in the order of the level's unique keys: the
        caller re-checks every answer with the exact rules (``Upstream``), so they are
        not matched here a second time.

        A search that needs only what it includes (``Search.include_only``) gets only
        those attributes, picked out of the stored header by SQLite (``json_extract``,
        a few microseconds) instead of the whole header decoded in Python.

        The first page is small (``FIRST_PAGE``) so the first answers go out at once,
        and each next page is read on the index thread while the current one is
        handed on (SQLite runs without the GIL meanwhile).
        """
        loop = asyncio.get_running_loop()
        keys = _SORT_KEYS[level]
        after: tuple[Any, ...] = ("",) * (keys - 1) + ((0,) if level == "instances" else ("",))
        limit = min(self.page_size, FIRST_PAGE)
        names = _extracted(level, search)
        pending = loop.run_in_executor(self._executor, self._search_page, level, search, after, limit)
        try:
            while True:
                rows = await pending
                more = len(rows) >= limit
                if more:
                    after, limit = tuple(rows[-1][:keys]), self.page_size
                    pending = loop.run_in_executor(self._executor, self._search_page, level, search, after, limit)
                for row in rows:
                    yield _result(level, row, names)
                if not more:
                    return
        finally:
            if not pending.done():
                pending.cancel()  # not started yet: never runs; running: its rows are dropped
            elif not pending.cancelled():
                pending.exception()  # retrieved, so an error of an abandoned page is not reported as lost

    def search_for_studies(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._search("studies", search)

    def search_for_series(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._search("series", search)

    def search_for_instances(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._search("instances", search)

    # -- retrieve (the archive's own files, never copied) ------------------------------

    def _locate(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> tuple[Path, str] | None:
        row = self._db.execute(
            "SELECT file, transfer_syntax FROM instances WHERE sop_instance_uid = ? AND study_uid = ? AND series_uid = ?",
            [sop_instance_uid, study_uid, series_uid],
        ).fetchone()
        return None if row is None else (self.root / row[0], row[1] or "")

    async def _existing(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> tuple[Path, str]:
        """The instance's file and stored syntax; NotFound if the index lacks it."""
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._executor, self._locate, study_uid, series_uid, sop_instance_uid)
        if found is None:
            raise NotFound("instance not in the embedded archive")
        return found

    async def retrieve_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        spill_area: SpillArea,
        spill_bytes: int,
        *,
        acceptable: Sequence[str],
        image_set_id: str | None = None,
    ) -> Retrieved:
        """The stored file itself; the embedded archive converts nothing, so a caller
        that does not accept the stored syntax gets UpstreamRejected (406)."""
        path, syntax = await self._existing(study_uid, series_uid, sop_instance_uid)
        if "*" not in acceptable and syntax not in acceptable:
            raise UpstreamRejected(f"the embedded archive holds the instance in {syntax} only", 406)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise NotFound("instance not in the embedded archive") from None
        return Retrieved(None, path, 0, size, transfer_syntax=syntax, checked=True)

    def _files(self, study_uid: str, series_uid: str | None, sop_instance_uid: str | None = None) -> list[tuple[str, str]]:
        """(file, stored syntax) of the instances of a study, series or one instance."""
        where, args = _where(study_uid, series_uid, sop_instance_uid)
        sql = f"SELECT file, transfer_syntax FROM instances WHERE {where} ORDER BY series_uid, rowid"
        return [(row[0], row[1] or "") for row in self._db.execute(sql, args).fetchall()]

    def _metadata_rows(self, study_uid: str, series_uid: str | None, sop_instance_uid: str | None) -> list[_MetadataRow]:
        """(file, study, series, SOP Instance UID, kept metadata text or None) of the
        instances of a study, series or one instance, in `_files`' order."""
        where, args = _where(study_uid, series_uid, sop_instance_uid)
        sql = (
            "SELECT file, study_uid, series_uid, sop_instance_uid, text"
            " FROM instances LEFT JOIN metadata_texts USING (sop_instance_uid)"
            f" WHERE {where} ORDER BY series_uid, instances.rowid"
        )
        return [tuple(row) for row in self._db.execute(sql, args).fetchall()]

    async def iter_instances(
        self, study_uid: str, series_uid: str | None, spill_area: SpillArea, spill_bytes: int
    ) -> AsyncGenerator[Retrieved, None]:
        """The stored files, each with its head read (`_heads`), HEAD_BATCH files per
        trip to a worker thread at most: one trip per file cost more than the read
        itself. Files up to ``spill_bytes`` (and WHOLE_PER_TRIP) come whole in memory,
        larger ones as their path."""
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(self._executor, self._files, study_uid, series_uid)
        start = 0
        while start < len(files):
            items, taken = await asyncio.to_thread(self._heads, files[start : start + HEAD_BATCH], spill_bytes)
            start += taken
            for item in items:
                yield item

    def _heads(self, files: list[tuple[str, str]], whole_up_to: int) -> tuple[list[Retrieved], int]:
        """What one trip reads of ``files``, and how many of them it took: each file
        whole when it is at most ``whole_up_to`` bytes and WHOLE_PER_TRIP (the trip
        ends before a file that would take it past WHOLE_PER_TRIP); else its size and head,
        its first SHORT_HEAD bytes when they hold the whole File Meta and the start of
        the data set after it, else META_HEAD bytes. Files deleted meanwhile are left
        out (the caller fetches what is missing one by one).

        A C-MOVE or C-GET waits for each sub-operation's response before sending the
        next instance: one read here, off the event loop, takes the next file's read
        out of that wait (the sender then writes it from memory). A file deleted after
        it was read is still sent: the move listed it before the DELETE."""
        out: list[Retrieved] = []
        room = WHOLE_PER_TRIP
        wholly = min(whole_up_to, WHOLE_PER_TRIP)
        for taken, (name, syntax) in enumerate(files):
            path = self.root / name
            try:
                with open(path, "rb", buffering=0) as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size <= wholly:
                        if size > room:
                            return out, taken  # the next trip starts with it
                        data = os.pread(fh.fileno(), size, 0)
                        if len(data) == size:
                            room -= size
                            out.append(Retrieved(data, path, 0, size, transfer_syntax=syntax, head=data, checked=True))
                            continue
                    head = os.pread(fh.fileno(), SHORT_HEAD, 0)
                    if len(head) < size and not _meta_within(head):
                        head = os.pread(fh.fileno(), META_HEAD, 0)
            except FileNotFoundError:
                continue
            out.append(Retrieved(None, path, 0, size, transfer_syntax=syntax, head=head, checked=True))
        return out, len(files)

    async def retrieve_metadata(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        image_set_id: str | None = None,
    ) -> list[JsonObject]:
        """Every attribute of the stored instances, bulk data as ``BulkDataURI``: see
        `metadata_json`."""
        kept = await self.retrieve_metadata_texts(study_uid, series_uid, sop_instance_uid)
        return await asyncio.to_thread(lambda: [json.loads(k.text) for k in kept])

    async def retrieve_metadata_texts(
        self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None
    ) -> list[MetadataText]:
        """`retrieve_metadata` as each instance's JSON text, for the facade to answer
        without parsing and serialising it again. The text kept in the index, or the
        file read on a worker thread (not the index's) when the index has none and
        `MetadataCache` does not hold it already; a text so read is then kept."""
        if sop_instance_uid is not None and series_uid is None:
            raise ValueError("an instance is addressed within its series")
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._executor, self._metadata_rows, study_uid, series_uid, sop_instance_uid)
        kept = [MetadataText(study, series, sop, text) for _, study, series, sop, text in rows if text is not None]
        if len(kept) < len(rows):
            kept, read = await asyncio.to_thread(self._read_metadata, rows)
            if read:
                self._keep_texts(read)
        if not kept:
            raise NotFound("nothing in the embedded archive there")
        return kept

    def _read_metadata(self, rows: list[_MetadataRow]) -> tuple[list[MetadataText], list[tuple[str, str, str]]]:
        """Each instance's metadata text: the index's, else its file's (`file_metadata`);
        and (text, SOP Instance UID, file) of those read from files, for the index to
        keep (`KEEP_TEXT`)."""
        out: list[MetadataText] = []
        read: list[tuple[str, str, str]] = []
        for name, study, series, sop, text in rows:
            if text is None:
                path = self.root / name
                try:
                    st = os.stat(path)
                    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
                    obj = self._metadata.get(name, stamp)
                    if obj is None:
                        obj = file_metadata(path)
                        self._metadata.put(name, stamp, obj)
                except FileNotFoundError:
                    continue  # deleted meanwhile
                text = metadata_text(obj)
                if len(text) <= archive_metadata.KEPT_METADATA_MAX:
                    read.append((text, sop, name))
            out.append(MetadataText(study, series, sop, text))
        return out, read

    def _keep_texts(self, read: list[tuple[str, str, str]]) -> None:
        """Keep in the index the texts just read from the files of rows indexed without
        one (by a version before the index kept them), so each file is read once and an
        upgraded archive fills as it is viewed, without a reindex. Off the request's
        path: the update waits its turn on the index's thread, and a failure is logged."""

        def keep() -> None:
            with immediate(self._db) as db:
                db.conn.executemany(KEEP_TEXT, read)

        def logged(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and (exc := done.exception()) is not None:
                log.warning("embedded archive: cannot keep %d metadata texts in the index: %s", len(read), exc)

        try:
            asyncio.get_running_loop().run_in_executor(self._executor, keep).add_done_callback(logged)
        except RuntimeError:  # the daemon is closing the archive: kept at the next read
            log.debug("embedded archive: closing, %d metadata texts not kept", len(read))

    async def retrieve_frames(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        frame_numbers: Sequence[int],
        *,
        acceptable: Sequence[str],
        image_set_id: str | None = None,
    ) -> AsyncGenerator[Frame, None]:
        """Frames cut out of the stored file as stored (nothing converted): a native
        frame read from its place on disk, a compressed one from its fragments."""
        if not frame_numbers or any(n < 1 for n in frame_numbers):
            raise UpstreamRejected("frame numbers must be given and start at 1", 400)
        path, stored = await self._existing(study_uid, series_uid, sop_instance_uid)
        async for frame in in_batches(partial(frame_reader, path, stored, frame_numbers, acceptable)):
            yield frame

    # -- delete (index rows first and durably, then the files) -------------------------

    def _delete_rows(self, where: str, args: list[str]) -> list[str]:
        with immediate(self._db) as db:
            files = [row[0] for row in db.execute(f"SELECT file FROM instances WHERE {where}", args).fetchall()]
            db.execute(
                f"DELETE FROM metadata_texts WHERE sop_instance_uid IN (SELECT sop_instance_uid FROM instances WHERE {where})",
                args,
            )
            db.execute(f"DELETE FROM instances WHERE {where}", args)
        return files

    async def _delete(self, where: str, args: list[str]) -> None:
        """Commit the removal from the index, then unlink: a crash in between leaves an
        unreferenced file, never a row whose file is gone."""
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(self._executor, self._delete_rows, where, args)
        if not files:
            raise NotFound("nothing in the embedded archive there")
        await asyncio.to_thread(self._unlink, files)
        log.info("embedded archive: deleted %d instance(s)", len(files))

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            (self.root / name).unlink(missing_ok=True)

    async def delete_study(self, study_uid: str) -> None:
        await self._delete(*_where(study_uid, None, None))

    async def delete_series(self, study_uid: str, series_uid: str) -> None:
        await self._delete(*_where(study_uid, series_uid, None))

    async def delete_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> None:
        await self._delete(*_where(study_uid, series_uid, sop_instance_uid))


# A row of `LocalUpstream._metadata_rows`.
_MetadataRow = tuple[str, str, str, str, "str | None"]


def _where(study_uid: str, series_uid: str | None, sop_instance_uid: str | None) -> tuple[str, list[str]]:
    """The index condition naming a study, series or one instance, and its arguments."""
    where, args = "study_uid = ?", [study_uid]
    if series_uid is not None:
        where, args = where + " AND series_uid = ?", args + [series_uid]
    if sop_instance_uid is not None:
        where, args = where + " AND sop_instance_uid = ?", args + [sop_instance_uid]
    return where, args


# Results in the first page of a search (later pages hold ``page_size``), as for
# the DICOMweb upstream: the first answers go out before the rest is read.
FIRST_PAGE = 100
# Columns of a search row that make its sort key, by level.
_SORT_KEYS = {"studies": 1, "series": 2, "instances": 3}


# The unique keys an answer of each level carries, whatever the search includes.
_LEVEL_UIDS = {"studies": (0x0020000D,), "series": (0x0020000D, 0x0020000E), "instances": (0x0020000D, 0x0020000E, 0x00080018)}


# Attributes extracted by SQLite at most: past them the whole header is read. SQLite
# refuses a function call with more than 127 arguments (SQLITE_MAX_FUNCTION_ARG): a
# C-FIND asking 130 return keys of the embedded archive failed with "too many
# arguments on function json_extract".
MAX_EXTRACTED = 100


def _extracted(level: str, search: Search) -> list[str] | None:
    """The attributes a search reads out of the stored header (DICOM JSON names), in
    order; None for the whole header."""
    if not search.include_only or search.include_all:
        return None
    tags = {*search.include, *(k.tag for k in search.keys), *_LEVEL_UIDS[level]}
    if len(tags) > MAX_EXTRACTED:
        return None
    return [f"{tag:08X}" for tag in sorted(tags)]


def _header_column(level: str, search: Search) -> str:
    """The SQL expression of a row's header: the stored JSON, or a JSON array of the
    extracted attributes (json_extract with two paths or more answers an array)."""
    names = _extracted(level, search)
    if names is None:
        return "i.metadata"
    paths = [f"'$.\"{name}\"'" for name in names]  # hex digits only: nothing to escape
    if len(paths) == 1:
        paths *= 2
    return f"json_extract(i.metadata, {', '.join(paths)})"


def _header(text: str | None, names: list[str] | None) -> dict[str, Any]:
    """The header of a search row as DICOM JSON (the attributes it has)."""
    if names is None:
        return json.loads(text or "{}")
    return {name: value for name, value in zip(names, json.loads(text or "[]")) if value is not None}


def _result(level: str, row: tuple[Any, ...], names: list[str] | None) -> dict[str, Any]:
    """One search row as DICOM JSON: the stored header (or the attributes extracted
    from it) plus, for studies and series, the attributes computed over their instances."""
    if level == "studies":
        _, metadata, mods, classes, series, instances = row
        obj = _header(metadata, names)
        obj["00080061"] = {"vr": "CS", "Value": sorted(m for m in (mods or "").split(",") if m)}
        obj["00080062"] = {"vr": "UI", "Value": sorted(c for c in (classes or "").split(",") if c)}
        obj["00201206"] = {"vr": "IS", "Value": [series]}
        obj["00201208"] = {"vr": "IS", "Value": [instances]}
        return obj
    if level == "series":
        obj = _header(row[2], names)
        obj["00201209"] = {"vr": "IS", "Value": [row[3]]}
        return obj
    return _header(row[3], names)


# Keys the index can narrow with SQL (exactly, before the Python rules run).
_UID_COLUMNS = {0x0020000D: "study_uid", 0x0020000E: "series_uid", 0x00080018: "sop_instance_uid"}
_TEXT_COLUMNS = {0x00100020: "patient_id", 0x00080050: "accession_number", 0x00080060: "modality"}
_MODALITIES_IN_STUDY = 0x00080061
_STUDY_DATE = 0x00080020


def _glob(value: str) -> str:
    """A C-FIND wildcard value as a SQLite GLOB pattern (same * and ?, '[' escaped)."""
    return value.replace("[", "[[]")


def _prefilter(level: str, search: Search) -> tuple[str, list[Any]]:
    """A WHERE clause over instance rows that keeps every possible match."""
    clauses: list[str] = []
    args: list[Any] = []
    if search.study_uid:
        clauses.append("study_uid = ?")
        args.append(search.study_uid)
    if search.series_uid:
        clauses.append("series_uid = ?")
        args.append(search.series_uid)
    for key in search.keys:
        if key.universal:
            continue
        column = _UID_COLUMNS.get(key.tag) or _TEXT_COLUMNS.get(key.tag)
        if key.tag == _MODALITIES_IN_STUDY and level == "studies" and not key.has_wildcard:
            column = "modality"
        elif key.tag == 0x00080060 and level == "studies":
            column = None  # a series attribute: not a study filter
        if column is not None:
            clause, values = _column_clause(column, key)
            clauses.append(clause)
            args += values
        elif key.tag == _STUDY_DATE and all(r.low or r.high for r in key.ranges):
            parts = []
            for r in key.ranges:
                parts.append("(study_date >= ? AND study_date <= ?)")
                args += [(r.low or "")[:8], (r.high or "99999999")[:8]]
            clauses.append("(" + " OR ".join(parts) + ")")
    return (" AND ".join(clauses) or "1"), args


def _column_clause(column: str, key: Key) -> tuple[str, list[Any]]:
    if key.has_wildcard:
        return "(" + " OR ".join(f"{column} GLOB ?" for _ in key.values) + ")", [_glob(v) for v in key.values]
    return f"{column} IN ({','.join('?' * len(key.values))})", list(key.values)
