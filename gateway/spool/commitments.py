"""Storage commitment requests kept until they are reported.

A modality told "request accepted" (N-ACTION-RSP) waits for its N-EVENT-REPORT; a
daemon restart in between must not lose it. The request is written here before the
N-ACTION-RSP and removed once reported (or given up on), so start-up finds the ones
still owed and reports them on a new association. The spool database commits with
``synchronous=NORMAL``: a request survives a crash or kill of the daemon, and a power
cut may lose it, which costs only the report (the modality asks again), never an image.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from gateway.spool.db import SpoolDB
from gateway.sqlite import immediate


@dataclass(frozen=True)
class PendingCommitment:
    id: int
    transaction_uid: str
    calling_ae: str
    refs: list[tuple[str, str]]  # (SOP class, SOP instance)


def record(db: SpoolDB, transaction_uid: str, calling_ae: str, refs: list[tuple[str, str]]) -> int:
    with db.connection() as conn, immediate(conn):
        cur = conn.execute(
            "INSERT INTO commitments (transaction_uid, calling_ae, refs, received_at) VALUES (?, ?, ?, ?)",
            [transaction_uid, calling_ae, json.dumps(refs), time.time()],
        )
        rowid = cur.lastrowid
        assert rowid is not None  # an INSERT's
        return rowid


def forget(db: SpoolDB, commitment_id: int) -> None:
    with db.connection() as conn, immediate(conn):
        conn.execute("DELETE FROM commitments WHERE id = ?", [commitment_id])


def pending(db: SpoolDB) -> list[PendingCommitment]:
    with db.connection() as conn:
        rows = list(conn.query("SELECT * FROM commitments ORDER BY id"))
    return [
        PendingCommitment(r["id"], r["transaction_uid"], r["calling_ae"], [tuple(x) for x in json.loads(r["refs"])])
        for r in rows
    ]
