"""The spool database: its schema, migrations and connection pool.

The spool's rows index the fsynced files under ``objects/``, which are what lets
C-STORE answer Success; see `Spool.recover`. C-STORE threads, the forwarder's
executor and the CLI borrow connections from `SpoolDB`'s pool.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from gateway.sqlite import Migration, connect, migrate


def _v1(db: sqlite_utils.Database) -> None:
    db.table("instances").create(
        {
            "id": int,
            "sop_instance_uid": str,
            "sop_class_uid": str,
            "study_uid": str,
            "series_uid": str,
            "transfer_syntax": str,
            "file": str,
            "size": int,
            "calling_ae": str,
            "received_at": float,
            "state": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "delivered_at": float,
        },
        pk="id",
        not_null={"sop_instance_uid", "study_uid", "file", "size", "state", "received_at"},
        defaults={"attempts": 0, "next_attempt_at": 0.0, "state": "queued"},
    )
    db.table("instances").create_index(["state", "next_attempt_at"])
    db.table("instances").create_index(["study_uid", "state"])


def _v2(db: sqlite_utils.Database) -> None:
    """Delivered instances the archive keeps apart from their study (HealthImaging's
    non-primary image sets), for ``spool status``."""
    db.table("instances").add_column("not_primary", int, not_null_default=0)


def _v3(db: sqlite_utils.Database) -> None:
    """Storage commitment requests answered but not yet reported, replayed at start-up
    (`gateway.spool.commitments`)."""
    db.table("commitments").create(
        {"id": int, "transaction_uid": str, "calling_ae": str, "refs": str, "received_at": float},
        pk="id",
        not_null={"transaction_uid", "calling_ae", "refs", "received_at"},
    )


def _v4(db: sqlite_utils.Database) -> None:
    """Copies of instances that routes send on to other DICOM nodes, each with its own
    delivery state (`gateway.spool.copies`); a spool file stays while one is pending."""
    db.table("copies").create(
        {
            "id": int,
            "instance_id": int,
            "destination": str,
            "state": str,
            "attempts": int,
            "next_attempt_at": float,
            "last_error": str,
            "delivered_at": float,
        },
        pk="id",
        not_null={"instance_id", "destination", "state"},
        defaults={"attempts": 0, "next_attempt_at": 0.0, "state": "queued"},
    )
    db.table("copies").create_index(["destination", "state", "next_attempt_at"])
    db.table("copies").create_index(["instance_id"])


def _v5(db: sqlite_utils.Database) -> None:
    """The AE title each instance was sent to (routes may match on it; empty for
    STOW-RS and for rows written before)."""
    db.table("instances").add_column("called_ae", str, not_null_default="")


def _v6(db: sqlite_utils.Database) -> None:
    """Studies an administrator discarded and when (`gateway.spool.discards`): an
    instance acknowledged before the discard whose row is written after it is
    withdrawn as it is written."""
    db.table("discards").create(
        {"study_uid": str, "discarded_at": float, "boot_id": str, "boot_seconds": float},
        pk="study_uid",
        not_null={"discarded_at", "boot_id", "boot_seconds"},
    )


def _v7(db: sqlite_utils.Database) -> None:
    """Rows found by SOP Instance UID (a storage commitment's `held`, polled every half
    second while it waits for delivery): without an index each 500 UIDs were a scan of
    the whole table, 0.17-0.2 s on a spool holding a day of 300,000 instances."""
    db.table("instances").create_index(["sop_instance_uid"])


def _v8(db: sqlite_utils.Database) -> None:
    """What `Spool.status` counts (every /metrics scrape, `spool status`) read from an
    index alone: instances and bytes per state were a scan of the whole table, and
    the delivered ones kept apart from their study a lookup of every delivered row,
    together 0.41 s on a spool holding a day of 300,000 instances; 0.09 s with it.
    (Since v11 the counts per state come from a tally; the second still uses it.)"""
    db.table("instances").create_index(["state", "not_primary", "size"])


def _v9(db: sqlite_utils.Database) -> None:
    """Delivered rows found in the order they were delivered (`Spool.evict_delivered`,
    run after every delivered batch while the spool is over ``max_size_mb``) and by
    their delivery time (`Spool.purge_delivered`, every ten minutes): on a spool
    holding a day of 300,000 delivered instances each eviction step sorted all of
    them (0.9 s for 100 rows), and each purge walked them all to find none old
    enough (0.45 s); with it 0.4 ms and nothing."""
    db.table("instances").create_index(["state", "delivered_at"])


def _v10(db: sqlite_utils.Database) -> None:
    """The oldest instance still waiting for delivery (`Spool.status`, every /metrics
    scrape) found at the start of each state's range: during an outage, exactly when
    it is watched, it was a walk through every waiting row, 0.24-0.38 s for a backlog
    of 200,000 instances; with it 0.02 ms."""
    db.table("instances").create_index(["state", "received_at"])


# Tallies of instances (and bytes) per state and of route copies per destination
# and state, kept by triggers in the same transaction as every insert, delete and
# change of the columns they count, so they never drift. (An upsert in a trigger
# body takes the VALUES form, which SQLite parses there without ambiguity.)
_TALLIES = """
CREATE TABLE state_counts (state TEXT PRIMARY KEY, n INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT INTO state_counts SELECT state, COUNT(*), COALESCE(SUM(size), 0) FROM instances GROUP BY state;
CREATE TRIGGER state_counts_in AFTER INSERT ON instances BEGIN
  INSERT INTO state_counts (state, n, bytes) VALUES (NEW.state, 1, NEW.size)
  ON CONFLICT (state) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;
END;
CREATE TRIGGER state_counts_out AFTER DELETE ON instances BEGIN
  UPDATE state_counts SET n = n - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
END;
CREATE TRIGGER state_counts_moved AFTER UPDATE OF state, size ON instances
WHEN OLD.state IS NOT NEW.state OR OLD.size IS NOT NEW.size BEGIN
  UPDATE state_counts SET n = n - 1, bytes = bytes - OLD.size WHERE state = OLD.state;
  INSERT INTO state_counts (state, n, bytes) VALUES (NEW.state, 1, NEW.size)
  ON CONFLICT (state) DO UPDATE SET n = n + 1, bytes = bytes + excluded.bytes;
END;
CREATE TABLE copy_counts (destination TEXT, state TEXT, n INTEGER NOT NULL, PRIMARY KEY (destination, state));
INSERT INTO copy_counts SELECT destination, state, COUNT(*) FROM copies GROUP BY destination, state;
CREATE TRIGGER copy_counts_in AFTER INSERT ON copies BEGIN
  INSERT INTO copy_counts (destination, state, n) VALUES (NEW.destination, NEW.state, 1)
  ON CONFLICT (destination, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER copy_counts_out AFTER DELETE ON copies BEGIN
  UPDATE copy_counts SET n = n - 1 WHERE destination = OLD.destination AND state = OLD.state;
END;
CREATE TRIGGER copy_counts_moved AFTER UPDATE OF destination, state ON copies
WHEN OLD.destination IS NOT NEW.destination OR OLD.state IS NOT NEW.state BEGIN
  UPDATE copy_counts SET n = n - 1 WHERE destination = OLD.destination AND state = OLD.state;
  INSERT INTO copy_counts (destination, state, n) VALUES (NEW.destination, NEW.state, 1)
  ON CONFLICT (destination, state) DO UPDATE SET n = n + 1;
END;
"""


def _v11(db: sqlite_utils.Database) -> None:
    """The tallies `Spool.status` reads at every /metrics scrape (`_TALLIES`): counted
    from the indexes, instances and bytes per state and copies per destination and
    state took 0.2-0.35 s on a spool of 300,000 instances and as many copies."""
    statement = ""
    for line in _TALLIES.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):  # (a trigger's body holds several)
            db.execute(statement)
            statement = ""


MIGRATIONS: list[Migration] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9, _v10, _v11]


class SpoolDatabaseUnreadable(Exception):
    """The spool database cannot be opened as one (a damaged file): the daemon does not
    start on it, and says how to recover from the record files."""

    def __init__(self, path: Path, reason: sqlite3.DatabaseError) -> None:
        super().__init__(
            f"the spool database {path} cannot be read ({reason}). The instances in the spool are "
            f"safe in their record files under {path.parent}: move {path.name} (and any {path.name}-wal, "
            f"{path.name}-shm) aside and start again, and start-up adopts every sealed record and queues it "
            "for delivery (those already delivered are delivered again; storage commitment reports still "
            "owed, routes' copies and withdrawals made with `spool discard` are forgotten)"
        )


class SpoolDB:
    """A small pool of connections to one spool database.

    C-STORE worker threads, the forwarder's executor and the CLI all use the spool;
    instead of per-thread connections a thread borrows one for one operation. The
    connections are opened with check_same_thread=False and are only ever used by
    one thread at a time.
    """

    def __init__(self, path: Path, busy_timeout: float = 60.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._idle: queue.SimpleQueue[sqlite_utils.Database] = queue.SimpleQueue()
        self._open: list[sqlite_utils.Database] = []
        self._lock = threading.Lock()
        try:
            with self.connection() as db:
                migrate(db, MIGRATIONS)
                db.execute("SELECT 1 FROM instances LIMIT 1").fetchone()  # a table read, not a count
        except sqlite3.DatabaseError as exc:
            self.close()
            raise SpoolDatabaseUnreadable(path, exc) from None

    @contextlib.contextmanager
    def connection(self) -> Iterator[sqlite_utils.Database]:
        try:
            db = self._idle.get_nowait()
        except queue.Empty:
            db = connect(self.path, durable=False, busy_timeout=self.busy_timeout)
            with self._lock:
                self._open.append(db)
        try:
            yield db
        finally:
            self._idle.put(db)

    def close(self) -> None:
        with self._lock:
            for db in self._open:
                db.close()
            self._open.clear()
