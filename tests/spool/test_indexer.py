"""Rows of sealed records are written off the acknowledgement's path, and never dropped."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import pydicom

from gateway.config import SpoolConfig
from gateway.spool.ingest import Verdict, ingest
from gateway.spool.queue import HELD, Spool
from gateway.spool.record import PREAMBLE, Sender
from tests.support.synth import ct_series


def store(spool: Spool, data: bytes) -> None:
    receipt = spool.receive()
    receipt.write(data[PREAMBLE:])
    assert ingest(spool, receipt, Sender("MOD")).verdict is Verdict.STORED


def test_rows_wait_while_the_database_is_locked_and_are_written_after(tmp_path: Path) -> None:
    """The spool database locked by another process: C-STOREs are still acknowledged
    (their records are sealed), /healthz hears why rows wait, and once the lock goes
    every row is written and the problem cleared."""
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0, busy_timeout=0.05))
    problems: list[str | None] = []
    written = threading.Event()
    spool.on_index_problem = problems.append
    spool.on_enqueue = written.set
    spool.start()
    files = [p.read_bytes() for p in ct_series(tmp_path / "ct", 5, 32, 32)]
    other = sqlite3.connect(spool.db.path)
    try:
        other.execute("BEGIN EXCLUSIVE")
        for data in files:
            store(spool, data)
        deadline = time.monotonic() + 10
        while not problems and time.monotonic() < deadline:
            time.sleep(0.02)
        assert problems and "locked" in str(problems[0])
        other.rollback()
        assert written.wait(10)
        deadline = time.monotonic() + 10
        while problems[-1] is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert problems[-1] is None
        assert spool.status()["counts"]["queued"] == 5
    finally:
        other.close()
        spool.close()


def test_rows_not_written_at_stop_are_adopted_at_the_next_start(tmp_path: Path) -> None:
    cfg = SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0, busy_timeout=0.05)
    spool = Spool(cfg)
    spool.start()
    other = sqlite3.connect(spool.db.path)
    other.execute("BEGIN EXCLUSIVE")
    for data in [p.read_bytes() for p in ct_series(tmp_path / "ct", 3, 32, 32)]:
        store(spool, data)
    spool.close()
    other.rollback()
    other.close()
    spool = Spool(cfg)
    try:
        assert spool.recover() == (0, 3)
    finally:
        spool.close()


def test_a_storage_commitments_instances_are_looked_up_not_scanned_for(tmp_path: Path) -> None:
    """`Spool.held` finds each SOP Instance UID through an index (SQLite's plan): a
    commitment waiting for delivery asks it every half second, and a scan of a spool
    holding a day of instances took 0.2 s per 500 UIDs."""
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0))
    try:
        with spool.db.connection() as db:
            plan = [step[3] for step in db.execute("EXPLAIN QUERY PLAN " + HELD.format("?,?"), ["1.2.3", "1.2.4"])]
    finally:
        spool.close()
    assert any("USING INDEX" in step and "(sop_instance_uid=?)" in step for step in plan), plan
    assert not any(step.startswith("SCAN instances") for step in plan), plan


def test_instances_whose_rows_wait_are_held_for_a_storage_commitment(tmp_path: Path) -> None:
    """A modality asks for commitment right after its C-STOREs were answered, before
    the indexer wrote their rows (here: the database locked for writes). The spool
    still holds them, as queued under their SOP class; a pending copy of an instance
    also known as dead counts by the better of the two."""
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0, busy_timeout=0.05))
    spool.start()
    paths = ct_series(tmp_path / "ct", 3, 32, 32)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    sop_class = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPClassUID)
    store(spool, paths[0].read_bytes())
    deadline = time.monotonic() + 10
    while spool.status()["counts"].get("queued") != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    with spool.db.connection() as db:
        db.execute("UPDATE instances SET state = 'dead'")
    other = sqlite3.connect(spool.db.path)
    try:
        other.execute("BEGIN EXCLUSIVE")
        for path in paths:
            store(spool, path.read_bytes())
        assert spool.held([*uids, "1.2.3.999"]) == {uid: ("queued", sop_class) for uid in uids}
    finally:
        other.rollback()
        other.close()
        spool.close()


def study_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def hold_rows_back(spool: Spool) -> threading.Event:
    """Before ``spool.start()``: its indexer writes no row until the event is set (as
    if the rows were still on their way when a discard runs)."""
    gate = threading.Event()
    insert = spool._insert_many

    def held_back(rows: list) -> None:  # type: ignore[type-arg]
        assert gate.wait(10)
        insert(rows)

    spool._insert_many = held_back  # type: ignore[method-assign]
    return gate


def test_a_discard_takes_instances_acknowledged_before_it_whose_rows_come_after(tmp_path: Path) -> None:
    """`spool discard` (another process) runs while acknowledged instances of the study
    still wait for their rows: they are withdrawn as their rows are written (files
    gone, nothing left to deliver); an instance of the study received after the
    discard, and another study's, are kept."""
    spool = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0))
    gate = hold_rows_back(spool)
    spool.start()
    study = ct_series(tmp_path / "ct", 3, 32, 32)
    other = ct_series(tmp_path / "other", 1, 32, 32)
    try:
        for path in [*study[:2], *other]:
            store(spool, path.read_bytes())
        early = {p.name for p in (tmp_path / "spool" / "objects").glob("*/*.dcm")}
        cli = Spool(SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0))
        assert cli.discard(study_of(study[0]), dry_run=False)["queued"] == 0  # no rows yet
        cli.close()
        store(spool, study[2].read_bytes())
        gate.set()
        deadline = time.monotonic() + 10
        while spool._indexer.waiting() and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        rows = spool.list_rows(limit=10)
        kept = {r["sop_instance_uid"] for r in rows}
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*study, *other]]
        assert kept == {uids[2], uids[3]} and {r["state"] for r in rows} == {"queued"}
        files = {p.name for p in (tmp_path / "spool" / "objects").glob("*/*.dcm")}
        assert len(files & early) == 1 and len(files) == 2  # the other study's, and the late one
    finally:
        gate.set()
        spool.close()


def test_records_adopted_at_start_up_of_a_study_discarded_since_are_withdrawn(tmp_path: Path) -> None:
    """The daemon stopped with rows unwritten; the study was discarded while it was
    down: its records sealed before are not adopted. One sealed after is."""
    cfg = SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0, busy_timeout=0.05)
    spool = Spool(cfg)
    spool.start()
    paths = ct_series(tmp_path / "ct", 3, 32, 32)
    other = sqlite3.connect(spool.db.path)
    other.execute("BEGIN EXCLUSIVE")
    for path in paths:
        store(spool, path.read_bytes())
    spool.close()
    other.rollback()
    other.close()
    records = sorted((tmp_path / "spool" / "objects").glob("*/*.dcm"))
    cli = Spool(cfg)
    cli.discard(study_of(paths[0]), dry_run=False)
    cli.close()
    later = time.time() + 60
    os.utime(records[0], (later, later))  # as if sealed after the discard
    spool = Spool(cfg)
    try:
        assert spool.recover() == (0, 1)
        assert [r["file"] for r in spool.list_rows(limit=10)] == [str(records[0].relative_to(tmp_path / "spool"))]
        assert list((tmp_path / "spool" / "objects").glob("*/*.dcm")) == [records[0]]
    finally:
        spool.close()


def test_a_withdrawal_that_fails_leaves_the_rows_dead_once(tmp_path: Path) -> None:
    """The rows are committed before their files go: a failure then (a directory that
    cannot be fsynced) must not make the indexer insert them again."""
    cfg = SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0)
    paths = ct_series(tmp_path / "ct", 2, 32, 32)
    cli = Spool(cfg)
    cli.discard(study_of(paths[0]), dry_run=False)
    cli.close()
    spool = Spool(cfg)

    def broken(rows: list) -> None:  # type: ignore[type-arg]
        raise OSError(5, "Input/output error")

    spool._withdraw = broken  # type: ignore[method-assign]
    spool.start()
    try:
        with spool.db.connection() as db:  # sealed before the discard, as far as the mark knows
            db.execute("UPDATE discards SET boot_seconds = boot_seconds + 3600, discarded_at = discarded_at + 3600")
        for path in paths:
            store(spool, path.read_bytes())
        deadline = time.monotonic() + 10
        while spool._indexer.waiting() and time.monotonic() < deadline:  # type: ignore[union-attr]
            time.sleep(0.02)
        time.sleep(0.2)
        rows = spool.list_rows(limit=10)
        assert len(rows) == 2 and {r["state"] for r in rows} == {"dead"}
        assert {r["last_error"] for r in rows} == {"discarded by an administrator"}
    finally:
        spool.close()


def test_instances_withdrawn_by_a_discard_are_not_held_for_a_storage_commitment(tmp_path: Path) -> None:
    """Acknowledged, rows still waiting, then their study discarded: a commitment asked
    now must not promise them (they are withdrawn as their rows are written)."""
    cfg = SpoolConfig(directory=tmp_path / "spool", min_free_mb=0, reserve_mb=0)
    spool = Spool(cfg)
    gate = hold_rows_back(spool)
    spool.start()
    paths = ct_series(tmp_path / "ct", 2, 32, 32)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    try:
        for path in paths:
            store(spool, path.read_bytes())
        assert set(spool.held(uids)) == set(uids)
        cli = Spool(cfg)
        cli.discard(study_of(paths[0]), dry_run=False)
        cli.close()
        assert spool.held(uids) == {}
    finally:
        gate.set()
        spool.close()
