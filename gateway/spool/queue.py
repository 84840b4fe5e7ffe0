"""The durable queue of received instances and their delivery state.

Life of a row: ``queued`` -> ``sending`` (claimed by a forwarder worker) ->
``delivered``, or ``failed`` (retry at ``next_attempt_at``) -> ... -> ``dead`` after
``max_attempts`` or ``max_age_hours``. Rows left in ``sending`` by a crash go back to
``queued`` at start-up: a crash between send and commit may deliver twice, never zero
times.

Files are named by a random token, never by a UID from the wire, and live under
``objects/xx/``; all 256 subdirectories are made durable when the spool is opened.
A C-STORE is received straight into its file (`receive`, a blank from the `Reserve`)
and `commit` seals it as a checksummed record with one ``fdatasync`` (`record`) before
it returns; STOW-RS parts arrive as files in ``incoming/`` and `enqueue` makes them
durable (file fsync, rename, directory fsync). Either way the row commit follows.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import Route, SpoolConfig
from gateway.fsutil import fsync_path, make_buckets
from gateway.header import HeaderError, InstanceHeader, read_header
from gateway.spool.copies import copies_status
from gateway.spool.db import SpoolDB
from gateway.spool.discards import Mark, boot_seconds
from gateway.spool.disk import Disk
from gateway.spool.indexer import Indexer, PendingRow
from gateway.spool.receipt import Receipt
from gateway.spool.record import BLANK_PREAMBLE, PREAMBLE, CorruptRecord, Sender, read_preamble, verify
from gateway.spool.reserve import Reserve
from gateway.sqlite import immediate, is_disk_full, synced
from gateway.upstream.base import StoreItem

log = logging.getLogger("gateway.spool")

STATES = ("queued", "sending", "delivered", "failed", "dead")
MiB = 1024 * 1024
# A disk limit is "near" (not ready, a gauge) when free space is under 110 % of the
# floor or the spool's files fill 90 % of its cap; delivered files are evicted down to
# 80 % of the cap, so a spool whose deliveries flow never comes near it.
NEAR_FLOOR = 1.1
NEAR_CAP = 0.9
EVICT_TO = 0.8
# What `Spool.status` counts: a tally (spool migration v11), and one index each (v8, v10).
COUNTS_BY_STATE = "SELECT state, n, bytes AS b FROM state_counts"
DELIVERED_NOT_PRIMARY = "SELECT COUNT(*) AS n FROM instances WHERE state='delivered' AND not_primary=1"
OLDEST_PENDING = "SELECT MIN(received_at) AS t FROM instances WHERE state IN ('queued','sending','failed')"
# The rows of the given SOP Instance UIDs (placeholders filled in), dead ones last.
HELD = "SELECT sop_instance_uid, state, sop_class_uid FROM instances WHERE sop_instance_uid IN ({}) ORDER BY state = 'dead'"
# A delivered instance's file may go (purge, eviction) only once every copy a route
# made of it has been delivered too.
NO_COPY_PENDING = (
    "NOT EXISTS (SELECT 1 FROM copies WHERE copies.instance_id = instances.id AND copies.state != 'delivered')"
)
# A claim: the study of the row due first, then that study's due rows, oldest first.
# The second is found by the study's index: the unary + keeps SQLite from taking
# the index on (state, next_attempt_at) instead, which it prefers without statistics
# and which walks every due row of every study (0.15 s per batch, under the write
# lock, with a backlog of 200,000).
CLAIM_FIRST = (
    "SELECT study_uid FROM instances WHERE state IN ('queued','failed') AND next_attempt_at <= ?"
    " ORDER BY next_attempt_at, id LIMIT 1"
)
CLAIM_OF_STUDY = (
    "SELECT * FROM instances WHERE study_uid = ? AND state IN ('queued','failed') AND +next_attempt_at <= ?"
    " ORDER BY id LIMIT ?"
)
# Delivered rows whose files may go: those delivered before a cut-off (purge), and
# the longest delivered first (eviction), both found through the index of spool
# migration v9, not by reading or sorting every delivered row.
PURGEABLE = f"SELECT id, file FROM instances WHERE state='delivered' AND delivered_at <= ? AND {NO_COPY_PENDING} LIMIT 500"
EVICTABLE = f"SELECT id, file, size FROM instances WHERE state='delivered' AND {NO_COPY_PENDING} ORDER BY delivered_at, id LIMIT 100"


# Free space is checked again after this much of an instance has arrived (a C-STORE's
# data set, a STOW-RS body), so no one instance takes the disk past the floor.
SPACE_CHECK_BYTES = 4 * 1024 * 1024


def _scope(study_uid: str, series_uid: str | None, sop_instance_uid: str | None) -> tuple[str, list[str]]:
    """The SQL condition on ``instances`` (and its parameters) for a study, or a series
    or an instance of it."""
    where, params = ["instances.study_uid = ?"], [study_uid]
    if series_uid is not None:
        where.append("instances.series_uid = ?")
        params.append(series_uid)
    if sop_instance_uid is not None:
        where.append("instances.sop_instance_uid = ?")
        params.append(sop_instance_uid)
    return " AND ".join(where), params


class SpoolFull(Exception):
    """Not enough free space to accept an instance durably."""


@dataclass(frozen=True)
class SpooledInstance:
    id: int
    sop_instance_uid: str
    sop_class_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    path: Path
    size: int
    attempts: int
    received_at: float

    def item(self) -> StoreItem:
        """The file and UIDs an upstream needs to store it."""
        return StoreItem(
            self.path, self.size, self.sop_instance_uid, self.sop_class_uid,
            self.study_uid, self.series_uid, self.transfer_syntax,
        )


@dataclass(frozen=True)
class Outcome:
    """What happened to one spooled instance in a delivery attempt: the upstream's
    `StoreOutcome` (same ``kind`` values) for the row ``instance_id``. A ``config``
    refusal does not count towards ``max_attempts``: nothing is wrong with the instance.
    """

    instance_id: int
    kind: str
    error: str = ""
    retry_after: float | None = None
    not_primary: bool = False


class Spool:
    """The spool directory and its database."""

    def __init__(self, cfg: SpoolConfig, routes: tuple[Route, ...] = ()) -> None:
        """``routes``: where copies of what is queued also go (`gateway.spool.copies`)."""
        self.cfg = cfg
        self.routes = routes
        self.directory = cfg.directory
        self.incoming = self.directory / "incoming"
        self.objects = self.directory / "objects"
        self.incoming.mkdir(parents=True, exist_ok=True)
        make_buckets(self.objects)
        self.db = SpoolDB(self.directory / "spool.sqlite", cfg.busy_timeout)
        self.on_enqueue: Callable[[], None] = lambda: None
        self.cap = cfg.max_size_mb * MiB  # 0: no cap
        # Bytes of the files in objects/ (the rows' sizes); files being received in
        # incoming/ are added when the cap is checked.
        self._stored_bytes = 0
        self._bytes_lock = threading.Lock()
        self._count_stored_bytes()
        self._waiters: dict[int, threading.Event] = {}
        self._outcomes: dict[int, Outcome] = {}
        self._waiters_lock = threading.Lock()
        self.disk = Disk()
        self.reserve = Reserve(self.objects, self.disk, cfg.reserve_mb * MiB, self._headroom)
        self._receiving: set[Receipt] = set()
        self._indexer: Indexer | None = None
        # Told why rows cannot be written (None: they can again); called on the indexer thread.
        self.on_index_problem: Callable[[str | None], None] = lambda reason: None
        # Told (study UID, how many) when a discard's mark withdraws late rows, for the
        # audit trail; called from the indexer thread, or at start-up.
        self.on_withdrawn: Callable[[str, int], None] = lambda study_uid, count: None

    def start(self) -> None:
        """The daemon's background work: the reserve of blanks, and the thread that
        indexes sealed records (before it runs, `commit` inserts each row itself)."""
        self.reserve.start()
        self._indexer = Indexer(
            self._insert_many, lambda: self.on_enqueue(), lambda reason: self.on_index_problem(reason)
        )
        self._indexer.start()

    def close(self) -> None:
        self.reserve.stop()
        if self._indexer is not None:
            self._indexer.stop()
            self._indexer = None
        self.db.close()

    def _headroom(self) -> int:
        return self.free_bytes() - self.cfg.min_free_mb * MiB

    # ---- start-up -------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Start-up: requeue rows a crash left in ``sending``, drop half-received temp
        files, and sort the files in ``objects/`` that have no row.

        A C-STORE is acknowledged once its record is sealed; the row is written after
        (by the indexer, and not fsynced: WAL, synchronous=NORMAL), so after a crash or
        a power cut a record may have no row. Such records are verified and queued
        again (delivery is idempotent, losing them is not); blanks go back to the
        reserve; a record that fails its checksum, or a file whose first page never
        landed, was never acknowledged and is removed. Returns (requeued, adopted).
        """
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)
        with self.db.connection() as db, immediate(db):
            requeued = db.execute(
                "UPDATE instances SET state='queued', next_attempt_at=0 WHERE state='sending'"
            ).rowcount
            requeued += db.execute("UPDATE copies SET state='queued', next_attempt_at=0 WHERE state='sending'").rowcount
        with self.db.connection() as db:
            known = {row["file"] for row in db.query("SELECT file FROM instances")}
        adopted = 0
        for path in sorted(self.objects.glob("*/*.dcm")):
            if str(path.relative_to(self.directory)) in known:
                continue
            kind, length, sender = self._classify(path)
            if kind == "blank":
                self.reserve.give_back(path, path.stat().st_size)
                continue
            if kind == "torn":
                # Never acknowledged: the seal's fdatasync did not return.
                log.warning("spool file %s was cut short before it was sealed; removed", path.name)
                path.unlink()
                continue
            try:
                header = read_header(path, None, None, size=length)
            except HeaderError as exc:
                log.error("spool file %s is unreadable (%s); moved aside", path.name, exc)
                path.rename(path.with_suffix(".unreadable"))
                continue
            if self._adopt(path, header, sender, length):
                adopted += 1
        self._count_stored_bytes()
        return requeued, adopted

    def _classify(self, path: Path) -> tuple[str, int | None, Sender]:
        """What a spool file without a row is: ("blank", None, _), ("torn", None, _), or
        ("instance", its length: a verified record's, None for a plain file, and the
        sender the record names)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            head = read_preamble(fd)
            if head.kind == "blank":
                return "blank", None, Sender()
            if head.kind == "plain":
                # A blank or receipt whose first page never reached the disk: zeros
                # where the preamble and the Part 10 prefix should be. (Anything else
                # without a record preamble is an instance as older spools wrote them.)
                start = os.pread(fd, PREAMBLE + 4, 0)
                if len(start) == PREAMBLE + 4 and not any(start):
                    return "torn", None, Sender()
                return "instance", None, Sender()
            try:
                verify(fd)
            except CorruptRecord:
                return "torn", None, Sender()
            return "instance", head.length, head.sender
        finally:
            os.close(fd)

    def _count_stored_bytes(self) -> None:
        """Recount the bytes of the spooled files from the database's tally (start-up,
        after a purge or eviction: the admin CLI may have purged from another process)."""
        with self.db.connection() as db:
            total = next(db.query("SELECT COALESCE(SUM(bytes), 0) AS b FROM state_counts"))["b"]
        with self._bytes_lock:
            self._stored_bytes = int(total)

    def _insert_many(self, rows: list[PendingRow]) -> None:
        """Insert the rows of sealed records in one transaction (the indexer's); those
        of a study discarded since they were sealed are withdrawn."""
        withdrawn: list[dict[str, Any]] = []
        with self.db.connection() as db, immediate(db):
            marks = self._marks(db, {row.header.study_uid for row in rows})
            for row in rows:
                mark = marks.get(row.header.study_uid)
                late = mark is not None and mark.takes(row.sealed_boot, row.received_at)
                row_id = self._insert_row(db, row.file, row.header, row.sender, row.received_at, row.size, late)
                if late:
                    withdrawn.append({"id": row_id, "file": self._name(row.file), "study_uid": row.header.study_uid})
        self._withdraw_late(withdrawn)

    def _insert(
        self, final: Path, header: InstanceHeader, sender: Sender, received_at: float, size: int | None = None
    ) -> int:
        """Insert one row; returns its id. (Its caller inserts before it acknowledges,
        so no discard can have missed it.)"""
        with self.db.connection() as db, immediate(db):
            return self._insert_row(db, final, header, sender, received_at, size)

    def _adopt(self, final: Path, header: InstanceHeader, sender: Sender, length: int | None) -> bool:
        """Insert the row of a record found at start-up without one (received when its
        file was last written); False when its study was discarded since, and the record
        is withdrawn instead."""
        received_at = final.stat().st_mtime
        with self.db.connection() as db, immediate(db):
            mark = self._marks(db, {header.study_uid}).get(header.study_uid)
            late = mark is not None and mark.takes(None, received_at)
            row_id = self._insert_row(db, final, header, sender, received_at, length, late)
        if late:
            self._withdraw_late([{"id": row_id, "file": self._name(final), "study_uid": header.study_uid}])
        return not late

    def _name(self, path: Path) -> str:
        """A spool file as its row names it."""
        return str(path.relative_to(self.directory))

    def _insert_row(
        self, db: Any, final: Path, header: InstanceHeader, sender: Sender, received_at: float, size: int | None,
        late: bool = False,
    ) -> int:
        """Insert a row, and the copies its routes want; a ``late`` one (its study was
        discarded after the record was sealed) goes in dead, with no copies, for
        `_withdraw_late` once the transaction commits."""
        cur = db.execute(
            "INSERT INTO instances (sop_instance_uid, sop_class_uid, study_uid, series_uid,"
            " transfer_syntax, file, size, calling_ae, called_ae, received_at, state, attempts,"
            " next_attempt_at, last_error) VALUES (?,?,?,?,?,?,?,?,?,?,?,0,0,?)",
            (
                header.sop_instance_uid,
                header.sop_class_uid,
                header.study_uid,
                header.series_uid,
                header.transfer_syntax,
                self._name(final),
                final.stat().st_size if size is None else size,
                sender.calling_ae,
                sender.called_ae,
                received_at,
                "dead" if late else "queued",
                "discarded by an administrator" if late else None,
            ),
        )
        row_id = int(cur.lastrowid or 0)
        if late:
            return row_id
        destinations = {
            r.destination for r in self.routes
            if r.matches(sender.calling_ae, sender.called_ae, header.sop_class_uid, header.modality)
        }
        for destination in sorted(destinations):
            db.execute("INSERT INTO copies (instance_id, destination, state) VALUES (?,?,'queued')", (row_id, destination))
        return row_id

    @staticmethod
    def _marks(db: Any, studies: set[str]) -> dict[str, Mark]:
        """The discard marks of these studies (`gateway.spool.discards`)."""
        found: dict[str, Mark] = {}
        listed = sorted(studies)
        for start in range(0, len(listed), 500):
            chunk = listed[start : start + 500]
            for study, wall, boot_id, boot in db.execute(
                "SELECT study_uid, discarded_at, boot_id, boot_seconds FROM discards"
                f" WHERE study_uid IN ({','.join('?' * len(chunk))})",
                chunk,
            ).fetchall():
                found[study] = Mark(wall, boot_id, boot)
        return found

    def _withdraw_late(self, rows: list[dict[str, Any]]) -> None:
        """`_withdraw` the rows just inserted dead for a discard. The rows are committed,
        so nothing may raise from here (the indexer would insert them again): a failure
        leaves them dead, which no forwarder sends, for ``spool list --state dead``."""
        if not rows:
            return
        try:
            self._withdraw(rows)
        except Exception:  # noqa: BLE001 - see above
            log.exception("could not remove %d instance(s) of a discarded study; they stay dead in the spool", len(rows))
            return
        per_study = collections.Counter(row["study_uid"] for row in rows)
        log.warning(
            "withdrew %d instance(s) acknowledged before their study was discarded (study %s)",
            len(rows), ", ".join(sorted(per_study)),
        )
        for study_uid, count in sorted(per_study.items()):
            self.on_withdrawn(study_uid, count)

    def _withdraw(self, rows: list[dict[str, Any]]) -> None:
        """Remove rows already dead (no forwarder claims them) for good: their files go
        and their directories are fsynced, then the rows. Removing a row before its file
        is durably gone could let start-up adopt the file as a record whose row a power
        cut lost, and deliver it."""
        if not rows:
            return
        directories = set()
        for row in rows:
            path = self.directory / row["file"]
            path.unlink(missing_ok=True)
            directories.add(path.parent)
        for directory in directories:
            fsync_path(directory, directory=True)
        self._remove(rows)
        self._count_stored_bytes()

    # ---- ingest (association threads) ----------------------------------------

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free

    def set_limits(self, cfg: SpoolConfig) -> None:
        """Take the disk limits (``min_free_mb``, ``max_size_mb``) of ``cfg`` (a reload)."""
        self.cfg = dataclasses.replace(self.cfg, min_free_mb=cfg.min_free_mb, max_size_mb=cfg.max_size_mb)
        self.cap = cfg.max_size_mb * MiB

    def used_bytes(self) -> int:
        """What the spool's files take: spooled instances plus those being received
        (ready blanks are not counted: they are room for what comes)."""
        with self._bytes_lock:
            receiving = sum(r.length for r in self._receiving)
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                try:
                    receiving += entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # finished or dropped meanwhile
        with self._bytes_lock:
            return self._stored_bytes + receiving

    def space_problem(self, incoming_size: int = 0) -> str | None:
        """Why ``incoming_size`` more bytes cannot be taken now: free space below
        ``min_free_mb``, or the spool's files above ``max_size_mb``; None when they can.
        The one check of both limits, at a C-STORE-RQ, during receipt and before an
        instance is queued. Raises OSError when the spool's file system cannot be read."""
        floor = self.cfg.min_free_mb * MiB
        free = self.free_bytes() + self.reserve.ready_bytes
        if free - incoming_size < floor:
            return f"spool free space {free // MiB} MiB is below the floor of {self.cfg.min_free_mb} MiB"
        if self.cap:
            used = self.used_bytes()
            if used + incoming_size > self.cap:
                return f"spool holds {used / MiB:.1f} MiB, over its cap of {self.cfg.max_size_mb} MiB"
        return None

    def check_space(self, incoming_size: int = 0) -> None:
        """Raise SpoolFull when accepting ``incoming_size`` more bytes would cross a limit."""
        problem = self.space_problem(incoming_size)
        if problem is not None:
            raise SpoolFull(problem)

    def limits_near(self) -> dict[str, bool]:
        """Whether each disk limit is close (``floor``: free space under 110 % of
        ``min_free_mb``; ``cap``: the spool at 90 % of ``max_size_mb``)."""
        floor = self.cfg.min_free_mb * MiB
        return {
            "floor": self.free_bytes() + self.reserve.ready_bytes < floor * NEAR_FLOOR,
            "cap": bool(self.cap) and self.used_bytes() >= self.cap * NEAR_CAP,
        }

    def needs_eviction(self) -> bool:
        """Whether delivered files should go to keep the spool under its cap."""
        if not self.cap:
            return False
        with self._bytes_lock:
            return self._stored_bytes > self.cap * EVICT_TO

    def receive(self) -> Receipt:
        """Start receiving an instance into a spool file: a ready blank, or a new file
        when the reserve is empty. Raises OSError when neither can be had."""
        blank = self.reserve.take()
        if blank is not None:
            path, capacity = blank
            receipt = Receipt(self.disk, path, self.disk.open(path), capacity, self._receipt_ended)
        else:
            token = uuid.uuid4().hex
            path = self.objects / token[:2] / f"{token}.dcm"  # the bucket exists: never created here
            fd = self.disk.create(path)
            try:
                self.disk.pwrite(fd, BLANK_PREAMBLE, 0)
            except OSError:
                self.disk.close(fd)
                self.disk.unlink(path)
                raise
            receipt = Receipt(self.disk, path, fd, None, self._receipt_ended)
        with self._bytes_lock:
            self._receiving.add(receipt)
        return receipt

    def _receipt_ended(self, receipt: Receipt) -> None:
        with self._bytes_lock:
            self._receiving.discard(receipt)
        if receipt.reusable and receipt.capacity is not None:
            self.reserve.give_back(receipt.path, receipt.capacity)

    def commit(
        self, receipt: Receipt, header: InstanceHeader, sender: Sender, watch: bool = False
    ) -> int | None:
        """Seal a received instance as a durable record and queue it; return its row id
        (None: the row is being written by the indexer).

        The one ``fdatasync`` of `Receipt.seal` is what a C-STORE Success rests on. Its
        row is not: a sealed record without a row is adopted at start-up (`recover`),
        so once the daemon runs (`start`) rows are written by the indexer thread, many
        per transaction, off the acknowledgement's path; only a watched row (``ack =
        "delivered"`` waits for it) is written here. Raises SpoolFull when the disk
        cannot take it; the receipt is then abandoned.
        """
        try:
            self.check_space()
            length = receipt.seal(sender)
        except OSError as exc:
            receipt.abandon()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool disk full: {exc.strerror}") from exc
            raise
        except SpoolFull:
            receipt.abandon()
            raise
        self.reserve.note(length)
        indexer = self._indexer
        if indexer is not None and not watch:
            with self._bytes_lock:
                self._stored_bytes += length
            indexer.add(PendingRow(receipt.path, header, sender, time.time(), length, boot_seconds()))
            return None
        return self._queue(receipt.path, header, sender, watch, length)

    def enqueue(
        self, temp_path: Path, header: InstanceHeader, sender: Sender, watch: bool = False
    ) -> int:
        """Make a received file durable and queue it; return its row id.

        ``temp_path`` must be on the spool's file system (the SCP writes it into
        ``incoming/``). With ``watch``, the caller may then `wait_outcome` for it.
        Raises SpoolFull when the disk cannot take it; the file is then removed.
        """
        token = uuid.uuid4().hex
        subdir = self.objects / token[:2]  # made durable at start-up: never created here
        final = subdir / f"{token}.dcm"
        try:
            self.check_space()
            fsync_path(temp_path)
            size = temp_path.stat().st_size
            os.replace(temp_path, final)
            fsync_path(subdir, directory=True)
        except OSError as exc:
            # Not acknowledged, so not kept: wherever the file got to.
            temp_path.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool disk full: {exc.strerror}") from exc
            raise
        except SpoolFull:
            temp_path.unlink(missing_ok=True)
            raise
        return self._queue(final, header, sender, watch, size)

    def _queue(self, final: Path, header: InstanceHeader, sender: Sender, watch: bool, size: int) -> int:
        """Insert the row of a file made durable; the file goes if the row cannot be."""
        try:
            # Registered under the waiters lock so a delivery that completes before
            # this returns still finds its waiter.
            with self._waiters_lock:
                row_id = self._insert(final, header, sender, time.time(), size)
                if watch:
                    self._waiters[row_id] = threading.Event()
        except Exception as exc:
            final.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise SpoolFull(f"spool database full: {exc}") from exc
            raise
        with self._bytes_lock:
            self._stored_bytes += size
        self.on_enqueue()
        return row_id

    def wait_outcome(self, row_id: int, timeout: float) -> Outcome | None:
        """Block until the first delivery attempt of a watched row ends (None: timed out)."""
        with self._waiters_lock:
            event = self._waiters.get(row_id)
        if event is None:
            return None
        event.wait(timeout)
        with self._waiters_lock:
            self._waiters.pop(row_id, None)
            return self._outcomes.pop(row_id, None)

    def release_waiters(self) -> None:
        """Wake every C-STORE still waiting for an outcome (shutdown): they answer
        "not delivered in time" and the rows stay queued."""
        with self._waiters_lock:
            for event in self._waiters.values():
                event.set()

    def answer_waiters(self, kind: str, error: str) -> None:
        """Give every watched row still waiting the outcome ``kind`` now: while delivery
        is held, waiting would only end in ``ack_timeout``. The rows stay queued."""
        with self._waiters_lock:
            for row_id, event in self._waiters.items():
                if not event.is_set():
                    self._outcomes[row_id] = Outcome(row_id, kind, error)
                    event.set()

    def _notify(self, outcomes: Iterable[Outcome]) -> None:
        with self._waiters_lock:
            for outcome in outcomes:
                event = self._waiters.get(outcome.instance_id)
                if event is not None:
                    self._outcomes[outcome.instance_id] = outcome
                    event.set()

    # ---- delivery (forwarder) -------------------------------------------------

    def instance_of(self, row: dict[str, Any]) -> SpooledInstance:
        """The instance an ``instances`` row describes (also joined to a route's copy)."""
        return SpooledInstance(
            id=row["id"],
            sop_instance_uid=row["sop_instance_uid"],
            sop_class_uid=row["sop_class_uid"],
            study_uid=row["study_uid"],
            series_uid=row["series_uid"],
            transfer_syntax=row["transfer_syntax"],
            path=self.directory / row["file"],
            size=row["size"],
            attempts=row["attempts"],
            received_at=row["received_at"],
        )

    def claim(self, max_instances: int, max_bytes: int) -> list[SpooledInstance]:
        """Take the oldest due instance and more of its study, up to the batch limits."""
        now = time.time()
        with self.db.connection() as db, immediate(db):
            first = next(db.query(CLAIM_FIRST, [now]), None)
            if first is None:
                self.pull_back(db, "instances", now)
                return []
            rows = db.query(CLAIM_OF_STUDY, [first["study_uid"], now, max_instances])
            batch: list[dict[str, Any]] = []
            total = 0
            for row in rows:
                if batch and total + row["size"] > max_bytes:
                    break
                batch.append(row)
                total += row["size"]
            ids = [r["id"] for r in batch]
            db.execute(
                f"UPDATE instances SET state='sending', attempts=attempts+1"
                f" WHERE id IN ({','.join('?' * len(ids))})",
                ids,
            )
        return [self.instance_of({**r, "attempts": r["attempts"] + 1}) for r in batch]

    def pull_back(self, db: Any, table: str, now: float, destination: str | None = None) -> None:
        """No retry is due later than ``retry_max_seconds`` from now. Retries are
        scheduled on the wall clock (they outlive a restart); one set back (an NTP step
        at boot, a VM restored from a snapshot) would leave them waiting the hours or
        days it went back. Run by a claim that found nothing due, in its transaction;
        the index makes it a look at one row when nothing is that late. ``destination``:
        a route's copies (``table`` ``copies``), whose index begins with it."""
        latest = now + self.cfg.retry_max_seconds
        mine = "" if destination is None else "destination = ? AND "
        db.execute(
            f"UPDATE {table} SET next_attempt_at = ? WHERE {mine}state IN ('queued','failed') AND next_attempt_at > ?",
            [latest, *([] if destination is None else [destination]), latest],
        )

    def check(self, batch: list[SpooledInstance]) -> dict[int, str]:
        """Check each claimed record against its checksum before the instance leaves the
        spool, so a damaged record is never delivered. (Readers take the row's
        ``size`` bytes: a record may sit in a longer blank.) Returns the ids that
        cannot be delivered, with why."""
        bad: dict[int, str] = {}
        for inst in batch:
            try:
                fd = os.open(inst.path, os.O_RDONLY)
            except OSError as exc:
                bad[inst.id] = f"spool file unreadable: {exc.strerror or exc}"
                continue
            try:
                verify(fd)
            except CorruptRecord as exc:
                log.error("spool record %s (id %d) is damaged: %s; not delivered", inst.path.name, inst.id, exc)
                bad[inst.id] = f"spool record damaged: {exc}"
            except OSError as exc:
                bad[inst.id] = f"spool file unreadable: {exc.strerror or exc}"
            finally:
                os.close(fd)
        return bad

    def next_due_in(self) -> float | None:
        """Seconds until the next failed row becomes due (None when nothing waits)."""
        with self.db.connection() as db:
            row = next(
                db.query(
                    "SELECT MIN(next_attempt_at) AS t FROM instances"
                    " WHERE state IN ('queued','failed')"
                ),
                None,
            )
        if row is None or row["t"] is None:
            return None
        return max(0.0, row["t"] - time.time())

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with full jitter in its upper half, capped."""
        base = min(self.cfg.retry_max_seconds, self.cfg.retry_base_seconds * 2 ** max(0, attempts - 1))
        return base * random.uniform(0.5, 1.0)

    def record(self, batch: list[SpooledInstance], outcomes: list[Outcome]) -> dict[int, str]:
        """Store the outcome of a delivery attempt; return the new state per row id."""
        now = time.time()
        by_id = {i.id: i for i in batch}
        states: dict[int, str] = {}
        max_age = self.cfg.max_age_hours * 3600
        with self.db.connection() as db, immediate(db):
            for outcome in outcomes:
                inst = by_id[outcome.instance_id]
                if outcome.kind == "delivered":
                    db.execute(
                        "UPDATE instances SET state='delivered', delivered_at=?, last_error=NULL, not_primary=?"
                        " WHERE id=?",
                        [now, int(outcome.not_primary), inst.id],
                    )
                    states[inst.id] = "delivered"
                elif outcome.kind == "config":
                    # Not the instance's fault: not an attempt, and due again at once.
                    db.execute(
                        "UPDATE instances SET state='failed', attempts=MAX(0, attempts-1), last_error=?"
                        " WHERE id=?",
                        [outcome.error, inst.id],
                    )
                    states[inst.id] = "failed"
                elif outcome.kind == "retry" and not (
                    inst.attempts >= self.cfg.max_attempts or now - inst.received_at > max_age
                ):
                    # The archive's Retry-After is honoured up to the longest pause
                    # (a proxy's "Retry-After: 99999999" must not park the instance for years).
                    delay = min(max(self.backoff(inst.attempts), outcome.retry_after or 0.0), self.cfg.retry_max_seconds)
                    db.execute(
                        "UPDATE instances SET state='failed', next_attempt_at=?, last_error=?"
                        " WHERE id=?",
                        [now + delay, outcome.error, inst.id],
                    )
                    states[inst.id] = "failed"
                else:
                    error = outcome.error
                    if outcome.kind == "retry":
                        error = f"gave up after {inst.attempts} attempts: {error}"
                    db.execute(
                        "UPDATE instances SET state='dead', last_error=? WHERE id=?",
                        [error, inst.id],
                    )
                    states[inst.id] = "dead"
        self._notify(outcomes)
        return states

    def release(self, batch: list[SpooledInstance]) -> None:
        """Put claimed rows back untouched (shutdown in the middle of a send)."""
        with self.db.connection() as db, immediate(db):
            db.execute(
                f"UPDATE instances SET state='queued', attempts=MAX(0, attempts-1)"
                f" WHERE state='sending' AND id IN ({','.join('?' * len(batch))})",
                [i.id for i in batch],
            )

    # ---- admin ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counts and bytes per state, the age of the oldest waiting instance, how many
        delivered instances the archive keeps apart from their study, how many
        storage commitment requests still owe their requester a report, and the copies
        routes send on, per destination."""
        with self.db.connection() as db:
            counts = {s: 0 for s in STATES}
            sizes = {s: 0 for s in STATES}
            for row in db.query(COUNTS_BY_STATE):
                counts[row["state"]] = row["n"]
                sizes[row["state"]] = row["b"]
            not_primary = next(db.query(DELIVERED_NOT_PRIMARY))["n"]
            oldest = next(db.query(OLDEST_PENDING))["t"]
            owed = next(db.query("SELECT COUNT(*) AS n FROM commitments"))["n"]
            routes = copies_status(db)
        return {
            "counts": counts,
            "bytes": sizes,
            "delivered_not_primary": not_primary,
            "commitments_owed": owed,
            "oldest_pending_age_seconds": round(time.time() - oldest, 1) if oldest else None,
            "free_bytes": self.free_bytes(),
            "routes": routes,
        }

    def list_rows(
        self,
        state: str | None = None,
        limit: int = 100,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        calling_ae: str | None = None,
        called_ae: str | None = None,
        since: float | None = None,
        route: str | None = None,
        ids: Iterable[int] = (),
    ) -> list[dict[str, Any]]:
        """The newest rows matching every filter given (``since``: received at or after
        this time; ``ids``: these spool ids), newest first. With ``route``, the copies that route's destination is
        owed instead: each instance row with the copy's ``state``, ``attempts`` and
        ``last_error`` (``state`` then filters the copies)."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("copies.state" if route is not None else "instances.state", state),
            ("instances.study_uid", study_uid),
            ("instances.series_uid", series_uid),
            ("instances.sop_instance_uid", sop_instance_uid),
            ("instances.calling_ae", calling_ae),
            ("instances.called_ae", called_ae),
            ("copies.destination", route),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("instances.received_at >= ?")
            params.append(since)
        wanted = [int(i) for i in ids]
        if wanted:
            where.append(f"instances.id IN ({','.join('?' * len(wanted))})")
            params.extend(wanted)
        if route is None:
            sql = "SELECT * FROM instances"
        else:
            sql = (
                "SELECT instances.id, sop_instance_uid, sop_class_uid, study_uid, series_uid, transfer_syntax,"
                " file, size, calling_ae, called_ae, received_at, destination, copies.state, copies.attempts,"
                " copies.last_error, copies.delivered_at FROM copies JOIN instances ON instances.id = copies.instance_id"
            )
        sql += (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY instances.id DESC LIMIT ?"
        params.append(limit)
        with self.db.connection() as db:
            return list(db.query(sql, params))

    def retry(self, ids: Iterable[int] = (), dead: bool = False, study_uid: str | None = None) -> int:
        """Requeue rows for immediate delivery: every dead one (``dead``), or the given
        ids, or every one of a study, in dead or failed (waiting for its next attempt)."""
        ids = list(ids)
        requeue = "UPDATE instances SET state='queued', attempts=0, next_attempt_at=0"
        with self.db.connection() as db, immediate(db):
            if ids:
                cur = db.execute(
                    f"{requeue} WHERE state IN ('dead','failed') AND id IN ({','.join('?' * len(ids))})", ids
                )
            elif study_uid is not None:
                cur = db.execute(f"{requeue} WHERE state IN ('dead','failed') AND study_uid = ?", [study_uid])
            elif dead:
                cur = db.execute(f"{requeue} WHERE state='dead'")
            else:
                return 0
            count = cur.rowcount
        if count:
            self.on_enqueue()
        return count

    def purge_delivered(self, older_than_seconds: float = 0.0) -> int:
        """Delete delivered rows (and their spool files) delivered before the cut-off."""
        cutoff = time.time() - older_than_seconds
        removed = 0
        while True:
            with self.db.connection() as db:
                rows = list(db.query(PURGEABLE, [cutoff]))
            if not rows:
                self._count_stored_bytes()
                return removed
            self._remove(rows)
            removed += len(rows)

    def held(self, sop_instance_uids: Iterable[str]) -> dict[str, tuple[str, str]]:
        """SOP Instance UID -> (state, SOP Class UID) of the given instances the spool
        holds; a UID received more than once counts by its best row (not dead before
        dead), for a storage commitment."""
        wanted = list(dict.fromkeys(sop_instance_uids))
        # Taken before the query: acknowledged instances whose rows the indexer has not
        # written yet are held too (queued), or a commitment asked right after the
        # C-STOREs would call them unknown.
        indexing = self._indexer.waiting() if self._indexer is not None else []
        found: dict[str, tuple[str, str]] = {}
        with self.db.connection() as db:
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                for row in db.query(HELD.format(",".join("?" * len(chunk))), chunk):
                    found.setdefault(row["sop_instance_uid"], (row["state"], row["sop_class_uid"] or ""))
            asked = set(wanted)
            indexing = [p for p in indexing if p.header.sop_instance_uid in asked]
            # ... unless their study was discarded since: they are withdrawn as written.
            marks = self._marks(db, {p.header.study_uid for p in indexing})
        for pending in indexing:
            uid = pending.header.sop_instance_uid
            mark = marks.get(pending.header.study_uid)
            if mark is not None and mark.takes(pending.sealed_boot, pending.received_at):
                continue
            if found.get(uid, ("dead",))[0] == "dead":
                found[uid] = ("queued", pending.header.sop_class_uid)
        return found

    def discard(
        self, study_uid: str, dry_run: bool = True, series_uid: str | None = None, sop_instance_uid: str | None = None,
        why: str = "discarded by an administrator",
    ) -> dict[str, int]:
        """Withdraw a study's undelivered instances (queued, failed, dead) so they are
        never sent: a study sent under the wrong patient must not reach the archive,
        nor a route's destination. Returns how many per state it took (or would take,
        ``dry_run``); under ``sending``, how many are on their way now (to the archive
        or as a route's copy) and were left alone; under ``copies``, how many copies of
        the study's delivered instances, not yet delivered by their routes, it withdrew
        too, and under ``copies_sending`` how many of those a route is sending now: that
        send may still arrive, but a failed one is not tried again (`Copies.record`).
        ``series_uid`` and ``sop_instance_uid`` narrow it to a series or an instance (a
        DELETE through the facade); ``why`` is the rows' last error while they go.

        Crash-safe in three steps: the rows and their copies turn ``dead`` (which no
        forwarder claims, in the same transaction that finds them, so none is claimed
        meanwhile), the files go and their directories are fsynced, then the rows go.
        Removing a row before its file is durably gone could let start-up adopt the
        file as a record whose row a power cut lost, and deliver it.

        A whole study's discard also leaves the study's mark (`gateway.spool.discards`):
        an instance acknowledged before now whose row the daemon has not written yet is
        withdrawn when it is written. A narrower one leaves none: its caller, the
        daemon, waits for those rows first (`indexing`).
        """
        where, params = _scope(study_uid, series_uid, sop_instance_uid)
        # The mark must outlive a power cut: records adopted at the next start read it.
        with self.db.connection() as db, synced(db), immediate(db):
            rows = list(
                db.query(
                    "SELECT id, file, CASE WHEN EXISTS (SELECT 1 FROM copies WHERE copies.instance_id = instances.id"
                    " AND copies.state = 'sending') THEN 'sending' ELSE state END AS state FROM instances"
                    f" WHERE {where} AND state IN ('queued','failed','dead','sending')",
                    params,
                )
            )
            taken = [r for r in rows if r["state"] != "sending"]
            copies: list[int] = []
            copies_sending = 0
            for r in db.query(
                f"SELECT copies.id, copies.state FROM copies JOIN instances ON instances.id = copies.instance_id"
                f" WHERE {where} AND instances.state = 'delivered' AND copies.state IN ('queued','failed','dead','sending')",
                params,
            ):
                copies.append(r["id"])
                copies_sending += r["state"] == "sending"
            if not dry_run:
                marks = ",".join("?" * len(taken))
                db.execute(
                    f"UPDATE instances SET state='dead', last_error=? WHERE id IN ({marks})",
                    [why, *(r["id"] for r in taken)],
                )
                db.execute(
                    f"UPDATE copies SET state='dead', last_error=? WHERE instance_id IN ({marks})",
                    [why, *(r["id"] for r in taken)],
                )
                db.execute(f"DELETE FROM copies WHERE id IN ({','.join('?' * len(copies))})", copies)
            if not dry_run and series_uid is None and sop_instance_uid is None:
                mark = Mark.now()
                db.execute(
                    "INSERT INTO discards (study_uid, discarded_at, boot_id, boot_seconds) VALUES (?,?,?,?)"
                    " ON CONFLICT (study_uid) DO UPDATE SET discarded_at = excluded.discarded_at,"
                    " boot_id = excluded.boot_id, boot_seconds = excluded.boot_seconds",
                    [study_uid, mark.wall, mark.boot_id, mark.boot],
                )
        counts = dict.fromkeys(("queued", "failed", "dead", "sending"), 0)
        for row in rows:
            counts[row["state"]] += 1
        counts["copies"], counts["copies_sending"] = len(copies), copies_sending
        if dry_run or not taken:
            return counts
        self._withdraw(taken)
        log.warning(
            "withdrew %d undelivered instance(s) of %s (%s)", len(taken), " / ".join(params), why,
        )
        return counts

    def indexing(self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None) -> int:
        """How many acknowledged instances of this study (series, instance) still wait
        for their rows (a few milliseconds, unless the spool database fails)."""
        waiting = self._indexer.waiting() if self._indexer is not None else []
        return sum(
            1 for p in waiting
            if p.header.study_uid == study_uid
            and series_uid in (None, p.header.series_uid)
            and sop_instance_uid in (None, p.header.sop_instance_uid)
        )

    def sending(self, study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None) -> int:
        """How many undelivered instances of this study (series, instance) are on their
        way now, to the archive or as a route's copy: what `discard` leaves alone."""
        where, params = _scope(study_uid, series_uid, sop_instance_uid)
        with self.db.connection() as db:
            (count,) = db.execute(
                f"SELECT count(*) FROM instances WHERE {where} AND (state = 'sending' OR (state != 'delivered' AND EXISTS"
                " (SELECT 1 FROM copies WHERE copies.instance_id = instances.id AND copies.state = 'sending')))",
                params,
            ).fetchone()
        return int(count)

    def evict_delivered(self) -> int:
        """Delete delivered instances, longest delivered first, until the spool's files
        are back under 80 % of ``max_size_mb`` (whatever ``retain_delivered_hours``
        says); returns how many went. What is not delivered yet is never evicted."""
        self._count_stored_bytes()
        removed = 0
        while self.needs_eviction():
            with self.db.connection() as db:
                rows = list(db.query(EVICTABLE))
            if not rows:
                break
            excess = self._stored_bytes - int(self.cap * EVICT_TO)
            chosen: list[dict[str, Any]] = []
            for row in rows:
                chosen.append(row)
                excess -= row["size"]
                if excess <= 0:
                    break
            self._remove(chosen)
            removed += len(chosen)
            self._count_stored_bytes()
        return removed

    def _remove(self, rows: list[dict[str, Any]]) -> None:
        """Delete these rows' spool files, then the rows."""
        for row in rows:
            (self.directory / row["file"]).unlink(missing_ok=True)
        ids = [r["id"] for r in rows]
        with self.db.connection() as db, immediate(db):
            db.execute(f"DELETE FROM copies WHERE instance_id IN ({','.join('?' * len(ids))})", ids)
            db.execute(f"DELETE FROM instances WHERE id IN ({','.join('?' * len(ids))})", ids)
