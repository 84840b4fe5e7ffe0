"""Every spool a test of this package closes is checked on the way: the tallies that
`Spool.status` reads (spool migration v11, kept by triggers) equal a count of the
rows. So each operation these tests drive (ingest, claims, outcomes, retries,
purges, evictions, discards, recovery, copies) is also a test of the tallies."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest

from gateway.spool.db import SpoolDB

TALLIED = "SELECT state, n, bytes FROM state_counts WHERE n != 0 OR bytes != 0 ORDER BY state"
COUNTED = "SELECT state, COUNT(*), SUM(size) FROM instances GROUP BY state ORDER BY state"
COPIES_TALLIED = "SELECT destination, state, n FROM copy_counts WHERE n != 0 ORDER BY destination, state"
COPIES_COUNTED = "SELECT destination, state, COUNT(*) FROM copies GROUP BY destination, state ORDER BY destination, state"


@pytest.fixture(autouse=True)
def tallies_equal_the_rows(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    close = SpoolDB.close

    def checked(self: SpoolDB) -> None:
        try:
            with self.connection() as db:
                seen = [db.execute(sql).fetchall() for sql in (TALLIED, COUNTED, COPIES_TALLIED, COPIES_COUNTED)]
        except sqlite3.DatabaseError:
            seen = []  # a database a test damaged, or one that never opened
        close(self)
        if seen:
            assert seen[0] == seen[1], f"instances per state: tallied {seen[0]}, counted {seen[1]}"
            assert seen[2] == seen[3], f"copies per destination and state: tallied {seen[2]}, counted {seen[3]}"

    monkeypatch.setattr(SpoolDB, "close", checked)
    yield
