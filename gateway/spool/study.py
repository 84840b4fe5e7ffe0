"""What the spool knows of one study, for an admin asked "where is my study?".

The spool keeps a row per received instance until ``retain_delivered_hours`` after
its delivery (undelivered rows stay until delivered), so for recent studies it can
say which series arrived, from which AE titles, when, and how far each instance got:
queued, being sent, delivered, waiting for a retry, or dead with the archive's reason.
The rows are grouped in SQL by series, state, sender and error, so a study of
thousands of instances is a few dozen rows to fold here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.spool.copies import COPY_STATES
from gateway.spool.db import SpoolDB
from gateway.spool.queue import STATES


@dataclass
class SeriesInSpool:
    """One series of a study as the spool holds it."""

    series_uid: str
    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    calling_aes: dict[str, int] = field(default_factory=dict)  # AE title -> instances it sent
    first_received: float = 0.0
    last_received: float = 0.0
    last_delivered: float | None = None
    # (state, last error) of failed and dead rows -> how many instances
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    # a route's destination -> its copies of the series per state
    copies: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(self.states.values())

    def as_json(self) -> dict[str, Any]:
        return {
            "series_uid": self.series_uid,
            "instances": self.instances,
            "states": self.states,
            "calling_aes": self.calling_aes,
            "first_received": self.first_received,
            "last_received": self.last_received,
            "last_delivered": self.last_delivered,
            "errors": [{"state": state, "error": error, "instances": n} for (state, error), n in self.errors.items()],
            "copies": self.copies,
        }


def discarded_at(db: SpoolDB, study_uid: str) -> float | None:
    """When ``spool discard`` last withdrew the study (its mark), None if never."""
    with db.connection() as conn:
        row = conn.execute("SELECT discarded_at FROM discards WHERE study_uid = ?", [study_uid]).fetchone()
    return None if row is None else float(row[0])


def study_in_spool(db: SpoolDB, study_uid: str) -> list[SeriesInSpool]:
    """The study's series in the spool, in the order they first arrived (empty when
    the spool holds no row of it: never received, or purged after delivery)."""
    sql = (
        "SELECT series_uid, state, calling_ae,"
        " CASE WHEN state IN ('failed','dead') THEN last_error END AS error,"
        " COUNT(*) AS n, MIN(received_at) AS first, MAX(received_at) AS last,"
        " MAX(delivered_at) AS delivered"
        " FROM instances WHERE study_uid = ? GROUP BY series_uid, state, calling_ae, error"
    )
    series: dict[str, SeriesInSpool] = {}
    with db.connection() as conn:
        groups = list(conn.query(sql, [study_uid]))
        copies = list(
            conn.query(
                "SELECT instances.series_uid AS series, copies.destination AS d, copies.state AS s, COUNT(*) AS n"
                " FROM copies JOIN instances ON instances.id = copies.instance_id WHERE instances.study_uid = ?"
                " GROUP BY series, d, s",
                [study_uid],
            )
        )
    for g in sorted(groups, key=lambda g: g["first"]):
        uid = g["series_uid"] or ""
        if uid not in series:  # groups come oldest first: its first arrival
            series[uid] = SeriesInSpool(uid, first_received=g["first"])
        s, n = series[uid], g["n"]
        s.states[g["state"]] = s.states.get(g["state"], 0) + n
        ae = g["calling_ae"] or ""
        s.calling_aes[ae] = s.calling_aes.get(ae, 0) + n
        s.last_received = max(s.last_received, g["last"])
        if g["delivered"] is not None:
            s.last_delivered = max(s.last_delivered or 0.0, g["delivered"])
        if g["error"] is not None:
            key = (g["state"], g["error"])
            s.errors[key] = s.errors.get(key, 0) + n
    for c in copies:
        if (uid := c["series"] or "") in series:
            series[uid].copies.setdefault(c["d"], dict.fromkeys(COPY_STATES, 0))[c["s"]] = c["n"]
    return list(series.values())
