"""The rows of sealed records, written off the acknowledgement's path.

A C-STORE is answered once its record is sealed (`Receipt.seal`); its row only tells
the forwarder it is there, and start-up adopts a sealed record whose row was lost. So
the row need not be written before the answer: this thread writes the rows of all
records sealed meanwhile in one transaction, which takes the spool database's write
lock (and its waits on the forwarder's transactions) off the C-STORE's path. A row it
cannot write now (database locked, disk full) stays queued here and is tried again
with backoff; the problem shows in /healthz until a write succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from gateway.header import InstanceHeader
from gateway.spool.record import Sender

log = logging.getLogger("gateway.spool")

BATCH = 500
FIRST_PAUSE = 0.05
MAX_PAUSE = 5.0


class PendingRow(NamedTuple):
    """What a row is made of, and when its record was sealed on the boot clock
    (`gateway.spool.discards`: a discard run meanwhile still takes it)."""

    file: Path
    header: InstanceHeader
    sender: Sender
    received_at: float
    size: int
    sealed_boot: float


class Indexer:
    """One thread inserting pending rows, many per transaction."""

    def __init__(
        self,
        insert: Callable[[list[PendingRow]], None],
        inserted: Callable[[], None],
        problem: Callable[[str | None], None] = lambda reason: None,
    ) -> None:
        """``insert`` writes rows in one transaction (raises on failure); ``inserted``
        is told after each success (the forwarder has work); ``problem`` gets the
        reason while rows cannot be written, then None."""
        self._insert = insert
        self._inserted = inserted
        self._problem = problem
        self._pending: list[PendingRow] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="spool-index", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, row: PendingRow) -> None:
        with self._cond:
            self._pending.append(row)
            self._cond.notify()

    def waiting(self) -> list[PendingRow]:
        """The rows not yet committed, those being inserted now included: a row leaves
        this list only after its transaction commits, so a reader that takes this list
        before querying the database misses no acknowledged instance."""
        with self._cond:
            return list(self._pending)

    def stop(self) -> None:
        """Write what is pending (one last try), then end. A row still unwritten is not
        lost: its sealed record is adopted at the next start."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
        if self._pending:
            log.warning(
                "%d spooled instance(s) not indexed at stop; they are adopted at the next start",
                len(self._pending),
            )

    def _run(self) -> None:
        pause = FIRST_PAUSE
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = self._pending[:BATCH]
            try:
                self._insert(batch)
            except Exception as exc:  # noqa: BLE001 - the rows wait; their records are durable
                if self._stopping:
                    return
                self._failed(exc, len(batch))
                with self._cond:
                    self._cond.wait(pause)
                pause = min(pause * 2, MAX_PAUSE)
                continue
            pause = FIRST_PAUSE
            with self._cond:
                del self._pending[: len(batch)]
            if self._failing_since is not None:
                log.info("spool rows written again after %.1f s", time.monotonic() - self._failing_since)
                self._failing_since = None
                self._problem(None)
            self._inserted()

    def _failed(self, exc: Exception, count: int) -> None:
        reason = f"cannot index spooled instances: {type(exc).__name__}: {exc}"
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error("%s; %d instance(s) wait, their records are durable", reason, count)
        self._problem(reason)
