"""Storage Commitment Push Model SCP (PS3.4 Annex J).

A modality asks, with an N-ACTION, whether the gateway has taken responsibility for a
list of instances, and deletes its own copies of those it is told are committed. The
gateway commits on the terms of its C-STORE Success (``dimse.ack``): with ``spooled``
to what it holds durably, an instance whose record is in the spool (acknowledged, so
never lost: queued, being sent, delivered or waiting for a retry); with ``delivered``
to what the archive accepted, waiting up to ``ack_timeout`` for the rest. Past the
spool's retention, an instance the archive holds (one instance search) is committed.
An instance the archive refused (dead in the spool) fails with 0x0110, one known
nowhere with 0x0112 (no such object instance), one stored under another SOP class
with 0x0119.

The answer, an N-EVENT-REPORT, goes first on the modality's own association, right
after the N-ACTION-RSP, as most modalities wait for it there; a modality that
released it at once (Orthanc does) gets it on a new association the gateway opens to
the modality's `[[dimse.peers]]` entry, taking the SCP role by role selection, as
does one that answered the report on its association with a failure status. A
report no association could carry is retried a few times, then logged, and the
modality asks again. A request is recorded in the spool database before it is
answered and forgotten once reported, so one a restart interrupted is reported at
start-up (`gateway.spool.commitments`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from gateway.codecs.syntaxes import IMPLICIT_VR_LE
from gateway.config import Config, Peer
from gateway.dimse import pdu
from gateway.dimse.association import Association, AcceptedContext, Message
from gateway.dimse.command import (
    HAS_DATASET,
    N_ACTION_RSP,
    N_EVENT_REPORT_RQ,
    N_EVENT_REPORT_RSP,
    STORAGE_COMMITMENT,
    STORAGE_COMMITMENT_INSTANCE,
    encode_command,
    response,
)
from gateway.dimse.requestor import UNCOMPRESSED, RequestorError, StoreRequestor
from gateway.metrics import Metrics
from gateway.model.json import first_text
from gateway.model.query import uid_key
from gateway.model.search import Search
from gateway.spool import commitments
from gateway.spool.queue import Spool
from gateway.uids import is_valid_uid
from gateway.upstream.base import Upstream

log = logging.getLogger("gateway.dimse")

REQUEST_COMMITMENT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs
# Failure Reasons (PS3.4 J.3.2.1.1.2) and N-ACTION statuses (PS3.7 C.4.1.1, C.5)
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
NO_SUCH_ACTION_TYPE = 0x0123
NO_SUCH_SOP_CLASS = 0x0118
INVALID_ARGUMENT_VALUE = 0x0115
INVALID_OBJECT_INSTANCE = 0x0117
SOP_INSTANCE_UID = 0x00080018
# How long a report waits for its N-EVENT-REPORT-RSP on the modality's association,
# and how often (and how far apart) a new association is tried after that.
SAME_ASSOCIATION_SECONDS = 10.0
NEW_ASSOCIATION_TRIES = 3
RETRY_SECONDS = 5.0


class BadRequest(ValueError):
    """An N-ACTION this service cannot take, with the status to answer."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass
class Commitment:
    """The decision on one request: what is committed, what failed and why."""

    transaction_uid: str
    committed: list[tuple[str, str]] = field(default_factory=list)  # (SOP class, SOP instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # ... and Failure Reason

    def report(self, transfer_syntax: str, ae_title: str) -> bytes:
        """The N-EVENT-REPORT data set (PS3.4 Table J.3-2), in the context's syntax."""
        ds = Dataset()
        ds.TransactionUID = self.transaction_uid
        ds.RetrieveAETitle = ae_title
        if self.committed:
            ds.ReferencedSOPSequence = DicomSequence([_item(c, i) for c, i in self.committed])
        if self.failed:
            ds.FailedSOPSequence = DicomSequence([_item(c, i, reason) for c, i, reason in self.failed])
        out = DicomBytesIO()
        out.is_little_endian = True
        out.is_implicit_VR = transfer_syntax == IMPLICIT_VR_LE
        write_dataset(out, ds)
        return out.getvalue()


def _item(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def parse_request(message: Message) -> tuple[str, list[tuple[str, str]]]:
    """The Transaction UID and the (SOP class, SOP instance) pairs of an N-ACTION-RQ.
    Raises BadRequest."""
    command = message.command
    if message.context.abstract_syntax != STORAGE_COMMITMENT or command.get(0x0003) != STORAGE_COMMITMENT:
        raise BadRequest(NO_SUCH_SOP_CLASS, "N-ACTION outside the Storage Commitment Push Model SOP Class")
    if str(command.get(0x1001, "")) != STORAGE_COMMITMENT_INSTANCE:
        raise BadRequest(INVALID_OBJECT_INSTANCE, "Requested SOP Instance UID is not the well-known 1.2.840.10008.1.20.1.1")
    if command.get(0x1008) != REQUEST_COMMITMENT:
        raise BadRequest(NO_SUCH_ACTION_TYPE, f"Action Type ID {command.get(0x1008)} is not 1 (request commitment)")
    if message.dataset is None:
        raise BadRequest(INVALID_ARGUMENT_VALUE, "N-ACTION without a data set")
    try:
        ds = read_dataset(
            BytesIO(message.dataset), message.context.transfer_syntax == IMPLICIT_VR_LE, True
        )
        transaction = str(ds.get("TransactionUID", ""))
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)) for i in ds.get("ReferencedSOPSequence") or []]
    except Exception as exc:  # noqa: BLE001 - any unreadable data set is the requester's error
        raise BadRequest(INVALID_ARGUMENT_VALUE, f"unreadable data set: {exc}") from None
    if not is_valid_uid(transaction):
        raise BadRequest(INVALID_ARGUMENT_VALUE, "Transaction UID missing or not a UID")
    if not refs:
        raise BadRequest(INVALID_ARGUMENT_VALUE, "Referenced SOP Sequence empty")
    return transaction, refs


def _named(message: Message) -> dict[int, int | str | tuple[int, ...]]:
    """The N-ACTION-RSP's Affected SOP Instance UID: the instance the request named
    (PS3.7 10.1.4.1.7; dcmtk-based requesters such as Orthanc refuse a response
    without it)."""
    requested = str(message.command.get(0x1001, ""))
    return {0x1000: requested} if requested else {}


class CommitmentService:
    """The N-ACTION handler, with what it decides from: the spool and the archive."""

    def __init__(self, config: Config, spool: Spool, upstream: Upstream, metrics: Metrics | None = None) -> None:
        self.config = config
        self.spool = spool
        self.upstream = upstream
        self.metrics = metrics
        self._reports: set[asyncio.Task[None]] = set()

    async def __call__(self, assoc: Association, message: Message) -> None:
        try:
            transaction, refs = parse_request(message)
        except BadRequest as exc:
            log.warning("storage commitment request from %s refused (0x%04X): %s", assoc.peer, exc.status, exc)
            await assoc.send_message(message.context.id, response(message.command, N_ACTION_RSP, exc.status, extra=_named(message)))
            return
        try:
            row = await asyncio.to_thread(commitments.record, self.spool.db, transaction, assoc.calling_ae.strip(), refs)
        except Exception as exc:  # noqa: BLE001 - a request we cannot keep is refused, not accepted
            log.error("storage commitment %s from %s not accepted: cannot record it: %s", transaction, assoc.peer, exc)
            await assoc.send_message(
                message.context.id, response(message.command, N_ACTION_RSP, PROCESSING_FAILURE, extra=_named(message))
            )
            return
        await assoc.send_message(
            message.context.id,
            response(message.command, N_ACTION_RSP, 0x0000, extra={**_named(message), 0x1008: REQUEST_COMMITMENT}),
        )
        self._spawn(self._decide_and_report(row, transaction, assoc.calling_ae.strip(), refs, (assoc, message.context)))

    def resume(self) -> None:
        """Report the requests a previous run accepted but did not report (start-up):
        on a new association, since the one they came on is gone."""
        for owed in commitments.pending(self.spool.db):
            log.info("storage commitment %s from %s: reporting after a restart", owed.transaction_uid, owed.calling_ae)
            self._spawn(self._decide_and_report(owed.id, owed.transaction_uid, owed.calling_ae, owed.refs, None))

    async def stop(self) -> None:
        """Cancel the reports in progress; their requests stay recorded for the next run."""
        for task in list(self._reports):
            task.cancel()
        await asyncio.gather(*self._reports, return_exceptions=True)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _decide_and_report(
        self,
        row: int,
        transaction: str,
        calling_ae: str,
        refs: list[tuple[str, str]],
        origin: tuple[Association, AcceptedContext] | None,
    ) -> None:
        decision = await self.decide(transaction, refs)
        log.info(
            "storage commitment %s from %s: %d committed, %d failed",
            transaction, calling_ae, len(decision.committed), len(decision.failed),
        )
        via = await self._report(origin, calling_ae, decision)
        await asyncio.to_thread(commitments.forget, self.spool.db, row)  # reported, or given up on
        if self.metrics is not None:
            self.metrics.commitment_instances.labels("committed").inc(len(decision.committed))
            self.metrics.commitment_instances.labels("failed").inc(len(decision.failed))
            self.metrics.commitment_reports.labels(via).inc()

    async def decide(self, transaction: str, refs: list[tuple[str, str]]) -> Commitment:
        """Committed what the gateway holds durably; with ``dimse.ack = "delivered"``
        only what the archive accepted, waiting up to ``dimse.ack_timeout`` for the
        instances still on their way (the modality was told Success on the same terms)."""
        uids = [uid for _, uid in refs]
        held = await asyncio.to_thread(self.spool.held, uids)
        if self.config.dimse.ack == "delivered":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.dimse.ack_timeout
            while any(state not in ("delivered", "dead") for state, _ in held.values()) and loop.time() < deadline:
                await asyncio.sleep(0.5)
                held = await asyncio.to_thread(self.spool.held, uids)
        missing = [uid for uid in uids if uid not in held]
        archived: set[str] | None = set()
        if missing:
            archived = await self._in_archive(missing)
        decision = Commitment(transaction)
        for sop_class, uid in refs:
            state, stored_class = held.get(uid, ("", ""))
            if state == "dead" or (state and state != "delivered" and self.config.dimse.ack == "delivered"):
                decision.failed.append((sop_class, uid, PROCESSING_FAILURE))
            elif state and stored_class and stored_class != sop_class:
                decision.failed.append((sop_class, uid, CLASS_INSTANCE_CONFLICT))
            elif state or (archived is not None and uid in archived):
                decision.committed.append((sop_class, uid))
            else:
                reason = NO_SUCH_OBJECT_INSTANCE if archived is not None else PROCESSING_FAILURE
                decision.failed.append((sop_class, uid, reason))
        return decision

    async def _in_archive(self, uids: list[str]) -> set[str] | None:
        """Which of ``uids`` the archive holds (None: it could not be asked)."""
        found: set[str] = set()
        try:
            for start in range(0, len(uids), 100):
                chunk = uids[start : start + 100]
                search = Search(keys=(uid_key(SOP_INSTANCE_UID, chunk),), include=(SOP_INSTANCE_UID,))
                async for obj in self.upstream.search_for_instances(search):
                    found.add(first_text(obj, SOP_INSTANCE_UID))
        except Exception as exc:  # noqa: BLE001 - the commitment then fails those, it does not crash
            log.warning("storage commitment: the archive could not be asked about %d instance(s): %s", len(uids), exc)
            return None
        return found

    async def _report(
        self, origin: tuple[Association, AcceptedContext] | None, calling_ae: str, decision: Commitment
    ) -> str:
        """The N-EVENT-REPORT: on the requester's association (``origin``) while it is
        open, else on a new association to its configured address. Returns how it went
        (``same_association``, ``new_association``, ``undelivered``)."""
        event = ALL_COMMITTED if not decision.failed else SOME_FAILED
        values: dict[int, int | str | tuple[int, ...]] = {0x0002: STORAGE_COMMITMENT, 0x1000: STORAGE_COMMITMENT_INSTANCE, 0x1002: event}
        if origin is not None and await self._on_same_association(*origin, decision, values):
            return "same_association"
        peer = self.config.peer(calling_ae)
        if peer is None:
            log.warning(
                "storage commitment %s: %s is not in dimse.peers to be called back with the report",
                decision.transaction_uid, calling_ae,
            )
            return "undelivered"
        for attempt in range(1, NEW_ASSOCIATION_TRIES + 1):
            try:
                return await self._call_back(peer, decision, values)
            except RequestorError as exc:
                log.warning("storage commitment %s: report to %s, try %d: %s", decision.transaction_uid, peer.ae_title, attempt, exc)
            if attempt < NEW_ASSOCIATION_TRIES:
                await asyncio.sleep(RETRY_SECONDS)
        log.error("storage commitment %s: no report could reach %s", decision.transaction_uid, peer.ae_title)
        return "undelivered"

    async def _call_back(self, peer: Peer, decision: Commitment, values: dict[int, int | str | tuple[int, ...]]) -> str:
        """One new association to the requester, the gateway as SCP by role selection,
        carrying the report; raises RequestorError when it cannot be opened or breaks."""
        requestor = await StoreRequestor.to_peer(
            self.config, peer, [(STORAGE_COMMITMENT, list(UNCOMPRESSED))],
            roles=[pdu.RoleSelection(STORAGE_COMMITMENT, False, True)],
        )
        try:
            contexts = requestor.accepted.get(STORAGE_COMMITMENT) or {}
            if not contexts:
                log.warning("storage commitment %s: %s accepted no Storage Commitment context", decision.transaction_uid, peer.ae_title)
                return "undelivered"
            syntax, context_id = next(iter(contexts.items()))
            answer = await requestor.request(
                context_id, {**values, 0x0100: N_EVENT_REPORT_RQ}, decision.report(syntax, self.config.dimse.ae_title),
                N_EVENT_REPORT_RSP,
            )
        finally:
            await requestor.release()
        status = int(answer.get(0x0900, -1))  # type: ignore[arg-type]
        if not _taken(status):
            log.warning(
                "storage commitment %s: %s refused the report on a new association too (0x%04X); "
                "it is not sent again, the modality may ask again",
                decision.transaction_uid, peer.ae_title, status,
            )
            return "undelivered"
        log.info("storage commitment %s reported to %s on a new association (0x%04X)", decision.transaction_uid, peer.ae_title, status)
        return "new_association"

    async def _on_same_association(
        self, assoc: Association, context: AcceptedContext, decision: Commitment, values: dict[int, int | str | tuple[int, ...]]
    ) -> bool:
        """Whether the requester took the report on its own association."""
        if assoc.writer.is_closing():
            return False
        message_id = assoc.next_message_id()
        answered = assoc.expect_response(message_id)
        command = {**values, 0x0100: N_EVENT_REPORT_RQ, 0x0110: message_id, 0x0800: HAS_DATASET}
        try:
            await assoc.send_message(
                context.id, encode_command(command), decision.report(context.transfer_syntax, self.config.dimse.ae_title)
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + SAME_ASSOCIATION_SECONDS
            while not answered.done() and not assoc.writer.is_closing() and loop.time() < deadline:
                await asyncio.wait([answered], timeout=0.2)
        except OSError:  # SendError included: the association is gone
            return False
        finally:
            if not answered.done():
                answered.cancel()
        if answered.cancelled():
            return False
        status = int(answered.result().get(0x0900, -1))  # type: ignore[arg-type]
        if not _taken(status):
            log.warning(
                "storage commitment %s: %s answered the report on its association with 0x%04X; "
                "calling it back on a new one",
                decision.transaction_uid, assoc.peer, status,
            )
            return False
        log.info("storage commitment %s reported to %s (0x%04X)", decision.transaction_uid, assoc.peer, status)
        return True


def _taken(status: int) -> bool:
    """Whether an N-EVENT-REPORT-RSP status says the report was taken: Success or a
    warning (PS3.7 C.4.1.1, C.1). A modality that answers a failure on its own
    association (pynetdicom's answers 0x0110 when no handler takes reports there) may
    well take the report where it listens."""
    return status in (0x0000, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF
