"""The spool's frequent queries do work in proportion to what they answer, not to
the rows the spool holds: a busy site keeps a day of deliveries (300,000 rows), and
an outage leaves a backlog as large.

Work is counted in SQLite virtual machine instructions (a progress handler called
every 100), which depend on the query plan and the data, not on the machine's
speed. Each query below took at most 2,300 instructions on these 20,000 rows; in
the form it had before, 52,000 (a study's claim) to 131,000 (a route's claim), growing
with the spool (0.15-0.9 s each on 300,000 rows)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.config import SpoolConfig
from gateway.spool.copies import CLAIM_COPIES, COPY_COUNTS
from gateway.spool.queue import (
    CLAIM_FIRST,
    CLAIM_OF_STUDY,
    COUNTS_BY_STATE,
    DELIVERED_NOT_PRIMARY,
    EVICTABLE,
    OLDEST_PENDING,
    PURGEABLE,
    Spool,
)

ROWS = 20_000
STUDIES = 200
NOW = 2e9
# Hundreds of instructions a query may take to answer its few rows.
BOUND = 100


@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spool]:
    """A spool of 20,000 rows in 200 studies: half delivered (in delivery order), half
    waiting and due, each waiting one with a copy due for the route AI."""
    spool = Spool(SpoolConfig(directory=tmp_path_factory.mktemp("scale") / "spool", min_free_mb=0, reserve_mb=0))
    with spool.db.connection() as db:
        db.conn.executemany(
            "INSERT INTO instances (sop_instance_uid, study_uid, file, size, received_at, state, next_attempt_at,"
            " delivered_at) VALUES (?,?,?,?,?,?,?,?)",
            [
                (f"1.2.826.0.1.{i}", f"1.2.826.0.9.{i % STUDIES}", f"objects/{i}", 1000, 1e9 + i,
                 "queued" if i % 2 else "delivered", 0.0, None if i % 2 else 1e9 + i)
                for i in range(ROWS)
            ],
        )
        db.conn.executemany(
            "INSERT INTO copies (instance_id, destination, state) VALUES (?, 'AI', 'queued')",
            [(i + 1,) for i in range(1, ROWS, 2)],
        )
        db.conn.commit()
    yield spool
    spool.close()


def work(spool: Spool, sql: str, params: list[object]) -> tuple[int, int]:
    """(hundreds of VM instructions, rows answered) of one query."""
    ticks = 0

    def tick() -> int:
        nonlocal ticks
        ticks += 1
        return 0

    with spool.db.connection() as db:
        db.conn.set_progress_handler(tick, 100)
        try:
            rows = db.execute(sql, params).fetchall()
        finally:
            db.conn.set_progress_handler(None, 0)
    return ticks, len(rows)


@pytest.mark.parametrize(
    ("what", "sql", "params", "answered"),
    [
        ("the forwarder's claim: the study due first", CLAIM_FIRST, [NOW], 1),
        ("the forwarder's claim: that study's due rows", CLAIM_OF_STUDY, ["1.2.826.0.9.7", NOW, 32], 32),
        ("a route's claim: its due copies with their instances", CLAIM_COPIES, ["AI", NOW, 32], 32),
        ("eviction over the cap: the longest delivered", EVICTABLE, [], 100),
        ("the ten-minute purge, nothing old enough", PURGEABLE, [0.0], 0),
        ("every /metrics scrape: the oldest waiting instance", OLDEST_PENDING, [], 1),
        ("every /metrics scrape: instances and bytes per state", COUNTS_BY_STATE, [], 2),
        ("every /metrics scrape: delivered instances kept apart", DELIVERED_NOT_PRIMARY, [], 1),
        ("every /metrics scrape: copies per route and state", COPY_COUNTS, [], 1),
    ],
)
def test_a_frequent_query_does_not_walk_the_spool(spool: Spool, what: str, sql: str, params: list[object], answered: int) -> None:
    ticks, rows = work(spool, sql, params)
    assert rows == answered, what
    assert ticks < BOUND, f"{what}: {ticks * 100} instructions for {rows} rows"


def test_claims_take_the_oldest_due_rows_of_the_study_due_first(spool: Spool) -> None:
    """The claims answer what they answered before they were rewritten: the study of
    the row due first (ties by id), its due rows in id order; a route's copies oldest
    due first, each with its own instance."""
    with spool.db.connection() as db:
        (study,) = db.execute(CLAIM_FIRST, [NOW]).fetchone()
        rows = [row["id"] for row in db.query(CLAIM_OF_STUDY, [study, NOW, 5])]
        copies = [(row["copy_id"], row["id"]) for row in db.query(CLAIM_COPIES, ["AI", NOW, 3])]
    assert study == "1.2.826.0.9.1"  # the first waiting row, i = 1
    assert rows == [2, 202, 402, 602, 802]  # i = 1, 201, 401, ... (ids count from 1)
    assert copies == [(1, 2), (2, 4), (3, 6)]
