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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from gateway.fsutil import fsync_path
from gateway.spool.db import connect, immediate
from gateway.spool.queue import Outcome, SpooledInstance
from gateway.upstream.base import Health

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
        self.objects.mkdir(parents=True, exist_ok=True)
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
        target.parent.mkdir(exist_ok=True)
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
