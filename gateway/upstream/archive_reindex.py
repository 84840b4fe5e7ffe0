"""Rebuilding the embedded archive's index from its files.

The index (``<spool>/archive/index.sqlite``) is how searches and retrievals find the
archived instances; the instances themselves are Part 10 files under ``objects/``,
which the index only points at. So a damaged index (a disk error, a file written
over) loses none of them: `reindex` sets it aside and builds a new one from every
file's header, as the writer indexed each when it stored it. The daemon must not run
meanwhile: the caller holds the spool's lock (`dicom-gateway archive reindex`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import sqlite_utils

from gateway.sqlite import connect, immediate, migrate
from gateway.upstream.archive_metadata import kept_metadata
from gateway.upstream.archive_writer import INDEX, UNREADABLE, index_row, write_row
from gateway.upstream.local import MIGRATIONS

BATCH = 500  # rows per transaction


@dataclass
class Reindexed:
    """What a rebuild did: instances indexed, files it could not read (left where they
    are, named with the reason), the previous index files it set aside, and older
    copies of an instance found beside a newer one (left in place, not indexed)."""

    indexed: int = 0
    unreadable: list[str] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    older_copies: list[str] = field(default_factory=list)


def reindex(root: Path) -> Reindexed:
    """Set the index at ``root`` aside (renamed, never deleted) and index every file
    under ``root/objects`` again, oldest first, so that where two files hold one
    instance the newer is indexed, as the writer would have left it."""
    done = Reindexed()
    stamp = time.strftime("%Y%m%dT%H%M%S")
    for name in (INDEX, f"{INDEX}-wal", f"{INDEX}-shm"):
        old = root / name
        if old.exists():
            aside = root / f"{name}.before-reindex-{stamp}"
            old.rename(aside)
            done.set_aside.append(aside)
    db = connect(root / INDEX)
    try:
        migrate(db, MIGRATIONS)
        rows: dict[str, tuple[dict[str, Any], str | None]] = {}  # SOP Instance UID -> row and text, newest file last
        for path, st in _files_oldest_first(root / "objects"):
            relative = str(path.relative_to(root))
            try:
                encoded: dict[int, Any] = {}
                with open(path, "rb") as fh:
                    ds = pydicom.dcmread(fh, stop_before_pixels=True)
                    uids = (str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
                    syntax = str(ds.file_meta.TransferSyntaxUID)
                    row = index_row(ds, uids, syntax, st.st_size, st.st_mtime, relative, encoded)
                    text = kept_metadata(ds, fh, encoded)
            except UNREADABLE as exc:
                done.unreadable.append(f"{relative}: {type(exc).__name__}: {exc}")
                continue
            previous = rows.pop(row["sop_instance_uid"], None)
            if previous is not None:
                done.older_copies.append(previous[0]["file"])
            rows[row["sop_instance_uid"]] = row, text
            if len(rows) >= BATCH:
                _insert(db, rows, done)
        _insert(db, rows, done)
    finally:
        db.close()
        _owned_as(root)
    return done


def _owned_as(root: Path) -> None:
    """Give the new index the archive directory's owner: run by root (the admin's
    sudo), it would otherwise be root's, and the daemon, running as its own user,
    could not write it."""
    if os.geteuid() != 0:
        return
    owner = root.stat()
    for name in (INDEX, f"{INDEX}-wal", f"{INDEX}-shm"):
        path = root / name
        if path.exists():
            os.chown(path, owner.st_uid, owner.st_gid)


def _files_oldest_first(objects: Path) -> list[tuple[Path, os.stat_result]]:
    found: list[tuple[Path, os.stat_result]] = []
    for bucket in sorted(objects.iterdir()) if objects.is_dir() else ():
        if bucket.is_dir():
            found.extend((path, path.stat()) for path in bucket.glob("*.dcm"))
    found.sort(key=lambda item: item[1].st_mtime_ns)
    return found


def _insert(db: sqlite_utils.Database, rows: dict[str, tuple[dict[str, Any], str | None]], done: Reindexed) -> None:
    """Write ``rows`` and empty it; a row replacing one of an earlier batch (the same
    instance in an older file) names that file an older copy."""
    if not rows:
        return
    with immediate(db) as conn:
        for row, text in rows.values():
            earlier = write_row(conn, row, text)
            if earlier is None:
                done.indexed += 1
            else:
                done.older_copies.append(earlier)
    rows.clear()
