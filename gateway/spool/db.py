"""The spool database: connection policy, schema and numbered migrations.

SQLite in WAL mode. The spool's rows index the fsynced files under ``objects/``,
which are what lets C-STORE answer Success; see `Spool.recover`. C-STORE threads and the forwarder's
executor thread borrow connections from `SpoolDB`'s pool.
"""

from __future__ import annotations

import contextlib
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import sqlite_utils


def _v1(db: sqlite_utils.Database) -> None:
    db["instances"].create(
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
    db["instances"].create_index(["state", "next_attempt_at"])
    db["instances"].create_index(["study_uid", "state"])


MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1]


def connect(path: Path, durable: bool = True, busy_timeout: float = 60.0) -> sqlite_utils.Database:
    """Open a connection in WAL mode.

    ``durable``: every commit is fsynced (synchronous=FULL). The spool passes False:
    its acknowledgements rest on the fsynced files, and start-up re-adopts a file
    whose row a power cut lost, so a commit needs no fsync of its own.
    ``busy_timeout``: seconds an operation waits for another connection's lock
    before it fails with "database is locked".
    """
    conn = sqlite3.connect(str(path), timeout=busy_timeout, check_same_thread=False)
    db = sqlite_utils.Database(conn, execute_plugins=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
    db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    return db


def migrate(db: sqlite_utils.Database) -> None:
    """Apply the migrations this database has not seen, recording each one."""
    if "migrations" not in db.table_names():
        db["migrations"].create({"version": int, "applied_at": float}, pk="version")
    applied = {row["version"] for row in db["migrations"].rows}
    for version, step in enumerate(MIGRATIONS, start=1):
        if version in applied:
            continue
        with db.atomic():
            step(db)
            db["migrations"].insert({"version": version, "applied_at": time.time()})


@contextlib.contextmanager
def immediate(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A write transaction that takes the lock up front.

    A deferred transaction that reads and then writes can fail with SQLITE_BUSY
    without waiting when another thread committed in between; BEGIN IMMEDIATE waits
    on the busy timeout instead.

    On an error SQLite may already have rolled the transaction back itself (it does for
    SQLITE_FULL), so the rollback here is conditional: a failing ROLLBACK must not
    replace the error the caller decides on (``sqlite_errorcode``).
    """
    db.conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.conn.execute("COMMIT")
    except BaseException:
        if db.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.conn.execute("ROLLBACK")
        raise


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
        with self.connection() as db:
            migrate(db)

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
