"""The embedded archive: instances kept on local disk, indexed in SQLite.

The default upstream, so that a fresh install works with no archive anywhere. Stored
files are hard links to the spool files (same file system, no copy), so purging the
spool never removes archived data. The index holds the attributes C-FIND and QIDO
match on, plus each instance's header as DICOM JSON so any requested key can be
returned. All index access happens on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.dicomweb.json import dataset_from_json
from gateway.dicomweb.qido import Search
from gateway.dimse.query import Key
from gateway.fsutil import fsync_path, make_buckets
from gateway.spool.db import connect, immediate
from gateway.spool.queue import Outcome, SpooledInstance
from gateway.upstream.base import Health, JsonObject, Retrieved
from gateway.upstream.errors import NotFound

log = logging.getLogger("gateway.upstream")

INDEXED = {
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "accession_number": "AccessionNumber",
    "study_id": "StudyID",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
    "modality": "Modality",
    "series_number": "SeriesNumber",
    "series_description": "SeriesDescription",
    "instance_number": "InstanceNumber",
}


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def header_json(ds: pydicom.Dataset) -> str:
    """The data set without pixel data as DICOM JSON; unencodable elements are dropped."""
    out: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.group in (0x0002, 0x7FE0) or elem.tag.is_private and elem.VR in ("OB", "UN"):
            continue
        try:
            out.update(pydicom.Dataset({elem.tag: elem}).to_json_dict(bulk_data_threshold=65536))
        except Exception:  # noqa: BLE001 - one bad element must not lose the instance
            continue
    return json.dumps(out, separators=(",", ":"))


class LocalUpstream:
    """Archive on local disk under ``<spool>/archive``."""

    kind = "local"

    def __init__(self, spool_directory: Path) -> None:
        self.root = spool_directory / "archive"
        self.objects = self.root / "objects"
        # Every storage subdirectory is durable before any index row can point into
        # one, so storing never creates a directory (see make_buckets).
        make_buckets(self.objects)
        fsync_path(spool_directory, directory=True)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-archive")
        self._db = self._executor.submit(self._open).result()

    def _open(self) -> Any:
        db = connect(self.root / "index.sqlite")
        if "instances" not in db.table_names():
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
            db["instances"].create(columns, pk="sop_instance_uid")
            for cols in (["study_uid"], ["series_uid"], ["patient_id"], ["study_date"]):
                db["instances"].create_index(cols)
        return db

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._executor.submit(self._db.close).result()
        self._executor.shutdown(wait=True)

    def _store_one(self, inst: SpooledInstance) -> Outcome:
        try:
            ds = pydicom.dcmread(inst.path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            return Outcome(inst.id, "rejected", f"unreadable instance: {exc}")
        row: dict[str, Any] = {
            "sop_instance_uid": inst.sop_instance_uid,
            "sop_class_uid": inst.sop_class_uid,
            "study_uid": inst.study_uid,
            "series_uid": inst.series_uid,
            "transfer_syntax": inst.transfer_syntax,
            **{col: _text(ds, kw) for col, kw in INDEXED.items()},
            "size": inst.size,
            "stored_at": time.time(),
            "metadata": header_json(ds),
        }
        token = uuid.uuid4().hex
        target = self.objects / token[:2] / f"{token}.dcm"
        try:
            os.link(inst.path, target)
        except OSError:
            # Different file system (spool moved by hand): copy instead.
            with open(inst.path, "rb") as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        fsync_path(target.parent, directory=True)
        row["file"] = str(target.relative_to(self.root))
        previous = None
        with immediate(self._db) as db:
            old = next(
                db.query(
                    "SELECT file FROM instances WHERE sop_instance_uid = ?", [inst.sop_instance_uid]
                ),
                None,
            )
            previous = old["file"] if old else None
            db["instances"].upsert(row, pk="sop_instance_uid")
        if previous and previous != row["file"]:
            (self.root / previous).unlink(missing_ok=True)
        return Outcome(inst.id, "delivered", "replaced an older copy" if previous else "")

    async def store_instances(
        self, study_uid: str, instances: list[SpooledInstance]
    ) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        return [await loop.run_in_executor(self._executor, self._store_one, i) for i in instances]

    def _count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM instances").fetchone()[0])

    async def health(self) -> Health:
        loop = asyncio.get_running_loop()
        count = await loop.run_in_executor(self._executor, self._count)
        return Health(True, f"embedded archive, {count} instances")

    # -- search (QIDO-RS semantics over the index) ------------------------------------

    def _search_page(self, level: str, search: Search, offset: int) -> tuple[list[JsonObject], int]:
        """One page of candidates (SQL on indexed columns), then the exact rules in Python.

        Returns the matching objects and how many candidates the page held, so the
        caller knows when the index is exhausted.
        """
        where, args = _prefilter(level, search)
        if level == "studies":
            rows = self._db.execute(
                "SELECT MIN(rowid) AS first, group_concat(DISTINCT modality) AS mods, "
                "group_concat(DISTINCT sop_class_uid) AS classes, COUNT(DISTINCT series_uid) AS series, "
                "COUNT(*) AS instances FROM instances "
                f"WHERE study_uid IN (SELECT study_uid FROM instances WHERE {where}) "
                "GROUP BY study_uid ORDER BY study_uid LIMIT ? OFFSET ?",
                [*args, search.page_size, offset],
            ).fetchall()
        elif level == "series":
            rows = self._db.execute(
                "SELECT MIN(rowid) AS first, COUNT(*) AS instances FROM instances "
                f"WHERE series_uid IN (SELECT series_uid FROM instances WHERE {where}) "
                "GROUP BY series_uid ORDER BY study_uid, series_uid LIMIT ? OFFSET ?",
                [*args, search.page_size, offset],
            ).fetchall()
        else:
            rows = self._db.execute(
                f"SELECT rowid AS first FROM instances WHERE {where} "
                "ORDER BY study_uid, series_uid, rowid LIMIT ? OFFSET ?",
                [*args, search.page_size, offset],
            ).fetchall()
        if not rows:
            return [], 0
        firsts = [r[0] for r in rows]
        metadata = dict(
            self._db.execute(
                f"SELECT rowid, metadata FROM instances WHERE rowid IN ({','.join('?' * len(firsts))})", firsts
            ).fetchall()
        )
        tags = [k.tag for k in search.keys]
        out: list[JsonObject] = []
        for row in rows:
            obj: dict[str, Any] = json.loads(metadata[row[0]] or "{}")
            if level == "studies":
                obj["00080061"] = {"vr": "CS", "Value": sorted(m for m in (row[1] or "").split(",") if m)}
                obj["00080062"] = {"vr": "UI", "Value": sorted(c for c in (row[2] or "").split(",") if c)}
                obj["00201206"] = {"vr": "IS", "Value": [row[3]]}
                obj["00201208"] = {"vr": "IS", "Value": [row[4]]}
            elif level == "series":
                obj["00201209"] = {"vr": "IS", "Value": [row[1]]}
            ds = dataset_from_json(obj, tags)
            if all(k.matches(ds) for k in search.keys):
                out.append(obj)
        return out, len(rows)

    async def _search(self, level: str, search: Search) -> AsyncIterator[JsonObject]:
        loop = asyncio.get_running_loop()
        offset = 0
        while True:
            page, candidates = await loop.run_in_executor(
                self._executor, self._search_page, level, search, offset
            )
            for obj in page:
                yield obj
            if candidates < search.page_size:
                return
            offset += candidates

    def search_for_studies(self, search: Search) -> AsyncIterator[JsonObject]:
        return self._search("studies", search)

    def search_for_series(self, search: Search) -> AsyncIterator[JsonObject]:
        return self._search("series", search)

    def search_for_instances(self, search: Search) -> AsyncIterator[JsonObject]:
        return self._search("instances", search)

    # -- retrieve (the archive's own files, never copied) ------------------------------

    def _locate(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path | None:
        row = self._db.execute(
            "SELECT file FROM instances WHERE sop_instance_uid = ? AND study_uid = ? AND series_uid = ?",
            [sop_instance_uid, study_uid, series_uid],
        ).fetchone()
        return None if row is None else self.root / row[0]

    async def retrieve_instance(
        self, study_uid: str, series_uid: str, sop_instance_uid: str, spill_dir: Path, spill_bytes: int
    ) -> Retrieved:
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(self._executor, self._locate, study_uid, series_uid, sop_instance_uid)
        try:
            size = path.stat().st_size if path is not None else -1
        except FileNotFoundError:
            size = -1
        if path is None or size < 0:
            raise NotFound("instance not in the embedded archive")
        return Retrieved(None, path, 0, size)

    def _files(self, study_uid: str, series_uid: str | None) -> list[str]:
        sql, args = "SELECT file FROM instances WHERE study_uid = ?", [study_uid]
        if series_uid is not None:
            sql, args = sql + " AND series_uid = ?", args + [series_uid]
        return [row[0] for row in self._db.execute(sql, args).fetchall()]

    async def iter_instances(
        self, study_uid: str, series_uid: str | None, spill_dir: Path, spill_bytes: int
    ) -> AsyncIterator[Retrieved]:
        loop = asyncio.get_running_loop()
        for name in await loop.run_in_executor(self._executor, self._files, study_uid, series_uid):
            path = self.root / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue  # deleted meanwhile: the caller fetches what is missing one by one
            yield Retrieved(None, path, 0, size)

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
