"""SQLite as the spool and the embedded archive use it: connection policy, write
transactions and numbered migrations, in one place so both databases behave alike.

WAL mode (readers never block the writer), a busy timeout instead of immediate
SQLITE_BUSY, ``BEGIN IMMEDIATE`` for read-then-write transactions, and migrations
recorded in the database itself so a newer gateway upgrades an older database at
start-up, and the facade can add columns without a hand-run script.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]

def connect(path: Path, durable: bool = True, busy_timeout: float = 60.0) -> sqlite_utils.Database:
    """Open a connection in WAL mode, usable from any one thread at a time.

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


def migrate(db: sqlite_utils.Database, migrations: Sequence[Migration]) -> None:
    """Apply the migrations this database has not seen, each in its own transaction
    with its record, so a crash mid-way leaves the database at a known version."""
    if "migrations" not in db.table_names():
        db.table("migrations").create({"version": int, "applied_at": float}, pk="version")
    applied = {row["version"] for row in db["migrations"].rows}
    for version, step in enumerate(migrations, start=1):
        if version in applied:
            continue
        with db.atomic():
            step(db)
            db.table("migrations").insert({"version": version, "applied_at": time.time()})


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


@contextlib.contextmanager
def synced(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """Transactions opened inside are fsynced at commit (synchronous=FULL) on a
    connection opened without it, for a commit that must outlive a power cut."""
    db.execute("PRAGMA synchronous=FULL")
    try:
        yield db
    finally:
        db.execute("PRAGMA synchronous=NORMAL")


def is_disk_full(exc: BaseException) -> bool:
    """Whether a sqlite3 error is SQLITE_FULL (disk or quota full), by its code."""
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
