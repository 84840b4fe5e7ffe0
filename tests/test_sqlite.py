"""The shared SQLite helper: migrations run once each, in order, and are recorded."""

from __future__ import annotations

from pathlib import Path

import sqlite_utils

from gateway.sqlite import connect, migrate, synced
from gateway.upstream.local import MIGRATIONS as ARCHIVE_MIGRATIONS


def test_migrations_apply_once_and_in_order(tmp_path: Path) -> None:
    calls: list[int] = []

    def step(n: int):  # type: ignore[no-untyped-def]
        def run(db: sqlite_utils.Database) -> None:
            calls.append(n)
            db[f"t{n}"].create({"id": int}, pk="id")

        return run

    db = connect(tmp_path / "x.sqlite")
    migrate(db, [step(1), step(2)])
    migrate(db, [step(1), step(2), step(3)])
    assert calls == [1, 2, 3]
    assert [r["version"] for r in db["migrations"].rows] == [1, 2, 3]
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_archive_index_from_before_migrations_is_adopted(tmp_path: Path) -> None:
    """An embedded archive created before migrations existed keeps its rows, with no
    metadata text kept for them (their files are read when asked)."""
    db = connect(tmp_path / "index.sqlite")
    db["instances"].insert({"sop_instance_uid": "1.2.3", "file": "objects/ab/x.dcm"}, pk="sop_instance_uid")
    migrate(db, ARCHIVE_MIGRATIONS)
    assert db["instances"].count == 1
    assert [r["version"] for r in db["migrations"].rows] == [1, 2, 3]
    assert db["metadata_texts"].count == 0


def test_metadata_texts_kept_in_the_instances_rows_move_to_their_own_table(tmp_path: Path) -> None:
    """An index of the version that kept each text in its instance's row: the texts
    move to ``metadata_texts`` and the column goes, so a search scanning the rows
    reads only what it searches; the rows stay."""
    db = connect(tmp_path / "index.sqlite")
    migrate(db, ARCHIVE_MIGRATIONS[:2])
    db["instances"].insert_all(
        [
            {"sop_instance_uid": "1.2.3", "study_uid": "1.2", "series_uid": "1.2.1", "file": "objects/ab/x.dcm", "wado_metadata": '{"a": 1}'},
            {"sop_instance_uid": "1.2.4", "study_uid": "1.2", "series_uid": "1.2.1", "file": "objects/ab/y.dcm", "wado_metadata": None},
        ]
    )
    migrate(db, ARCHIVE_MIGRATIONS)
    assert [r["version"] for r in db["migrations"].rows] == [1, 2, 3]
    assert "wado_metadata" not in db["instances"].columns_dict
    assert [(r["sop_instance_uid"], r["file"]) for r in db["instances"].rows] == [("1.2.3", "objects/ab/x.dcm"), ("1.2.4", "objects/ab/y.dcm")]
    assert list(db["metadata_texts"].rows) == [{"sop_instance_uid": "1.2.3", "text": '{"a": 1}'}]


def test_synced_fsyncs_the_transactions_inside_it_and_no_others(tmp_path: Path) -> None:
    """A spool connection commits without fsync; `synced` makes the commits inside it
    durable (a discard's mark) and gives the pooled connection back as it was."""
    db = connect(tmp_path / "s.sqlite", durable=False)
    with synced(db):
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
