"""The one way a received instance enters the gateway: check its header, make it
durable in the spool, and (for ``ack = "delivered"``) wait for the archive's verdict.

C-STORE calls it today and the facade's STOW-RS will call it next, so both fronts give
the same guarantee: an instance is acknowledged only once it is fsynced into the spool.
The verdict is front-neutral; each front maps it to its own status (PS3.4 B.2.3 for
C-STORE, PS3.18 failure reasons and HTTP codes for STOW-RS). Blocking: run it in a
worker thread.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from gateway.header import HeaderError, InstanceHeader, Unreadable, read_header
from gateway.spool.queue import Spool, SpoolFull
from gateway.spool.receipt import Receipt
from gateway.spool.record import Sender

log = logging.getLogger("gateway.spool")


class Verdict(enum.Enum):
    STORED = "stored"  # durable in the spool; delivery follows
    DELIVERED = "delivered"  # durable, and the archive accepted it (waited for)
    UNREADABLE = "unreadable"  # not a parsable data set, or cut short
    MISMATCH = "mismatch"  # a required UID missing, invalid, or not the announced one
    NO_SPACE = "no space"  # the spool cannot take it now (floor, full disk, spool error)
    REFUSED = "refused"  # durable, but the archive refused it (it stays dead in the spool)
    NOT_DELIVERED = "not delivered"  # durable and queued, the archive has not taken it yet


@dataclass(frozen=True)
class Ingested:
    """What became of one received file; ``reason`` names keywords, never values.
    ``header``: its UIDs when the data set could be read (a front reports them)."""

    verdict: Verdict
    reason: str = ""
    header: InstanceHeader | None = None


def ingest(
    spool: Spool,
    received: Receipt | Path,
    sender: Sender,
    expected_class: str | None = None,
    expected_instance: str | None = None,
    wait_delivery: float | None = None,
    expected_study: str | None = None,
    refusal_level: int = logging.WARNING,
) -> Ingested:
    """Take a received instance into the spool: a C-STORE's `Receipt` (sealed here),
    or a STOW-RS part's file in the spool's ``incoming/`` (moved into the spool).

    ``sender`` says who sent it (an AE title and the one it called, or a STOW-RS
    client's address), for the row, the routes and the log.
    ``expected_class``/``expected_instance``/``expected_study``: the UIDs the request
    announced (a STOW-RS path names the study), checked against the data set. ``wait_delivery``: seconds to wait for the first delivery
    attempt (None: answer once durable). What was received is consumed either way:
    made durable, or dropped by the caller's cleanup when refused here.
    ``refusal_level``: of the line logged for an instance refused for what it holds
    (a STOW-RS request sums its refusals up in one line instead: a body of 100,000
    garbage parts wrote 100,000 warnings).
    """
    if isinstance(received, Receipt):
        path, size = received.path, received.length
    else:
        path, size = received, None
    source = sender.calling_ae
    try:
        header = read_header(path, expected_class, expected_instance, size=size)
    except HeaderError as exc:
        log.log(refusal_level, "instance from %s (%s) rejected: %s", source, (expected_instance or "?")[:64], exc)
        return Ingested(Verdict.UNREADABLE if isinstance(exc, Unreadable) else Verdict.MISMATCH, str(exc))
    uid = header.sop_instance_uid
    if expected_study is not None and header.study_uid != expected_study:
        log.log(refusal_level, "instance %s from %s is outside the study the request names", uid, source)
        return Ingested(Verdict.MISMATCH, "the instance is not in the study the request names", header)
    try:
        watch = wait_delivery is not None
        if isinstance(received, Receipt):
            row_id = spool.commit(received, header, sender, watch)
        else:
            row_id = spool.enqueue(received, header, sender, watch)
    except SpoolFull as exc:
        log.error("instance %s from %s refused: %s", uid, source, exc)
        return Ingested(Verdict.NO_SPACE, "spool full", header)
    except Exception as exc:  # noqa: BLE001 - never acknowledge what is not stored
        log.exception("instance %s from %s could not be spooled", uid, source)
        return Ingested(Verdict.NO_SPACE, f"spool error: {type(exc).__name__}", header)
    log.debug("spooled %s as id %s", uid, row_id if row_id is not None else "(being indexed)")
    if wait_delivery is None:
        return Ingested(Verdict.STORED, "", header)
    assert row_id is not None  # a watched row is written before commit returns
    outcome = spool.wait_outcome(row_id, wait_delivery)
    if outcome is None:
        return Ingested(Verdict.NOT_DELIVERED, "not delivered in time; still queued", header)
    if outcome.kind == "delivered":
        return Ingested(Verdict.DELIVERED, "", header)
    if outcome.kind == "rejected":
        return Ingested(Verdict.REFUSED, f"archive refused: {outcome.error}", header)
    return Ingested(Verdict.NOT_DELIVERED, "archive unavailable; still queued", header)
