"""The C-MOVE/C-GET service base (PS3.4 C.4.2 and C.4.3) on the retrieval engine.

The engine (`gateway.retrieval`) lists, fetches, converts and hands instances over in
order; what is DIMSE is here: the identifier becomes a `RetrieveRequest`
(`gateway.dimse.retrieve_request`, which also holds the statuses and the one table from
errors to them), the receivers are associations whose C-STORE-RSP statuses become the
engine's outcomes (`StoreSubOperations`), the engine's counts become Pending responses
(the Number of Remaining/Completed/Failed/Warning Sub-operations) and the final status
with its Failed SOP Instance UID List, and a C-CANCEL stops the engine between
sub-operations. Where the sub-operations go is the subclasses' (`gateway.dimse.move`,
`gateway.dimse.get`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from pydicom.dataset import Dataset

from gateway.audit.auditor import tally_of
from gateway.audit.message import Participant
from gateway.config import Config
from gateway.dimse.association import Association, Message
from gateway.dimse.command import Command, response
from gateway.dimse.find import decode_identifier, encode_identifier
from gateway.dimse.requestor import UNCOMPRESSED, RequestorError, SourceUnreadable
from gateway.dimse.retrieve_request import (
    CANCEL,
    OUT_OF_RESOURCES_SUBOPS,
    PENDING,
    STUDY_ROOT_CLASSES,
    SUCCESS,
    UNABLE_TO_PROCESS,
    WARNING,
    RetrieveError,
    failure_status,
    parse_retrieve_identifier,
)
from gateway.retrieval.bulk import BulkFeed
from gateway.retrieval.engine import Counts, Delivery, Outcome, Retriever, StoreTarget, TargetLost
from gateway.retrieval.listing import Listing
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.source import DataSource, Fetched

log = logging.getLogger("gateway.dimse")

# C-STORE statuses counted as warnings rather than failures (PS3.4 B.2.3)
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})

# Why an instance without a SOP Class UID (in the search answer and the file) fails:
# a C-STORE-RQ must name it (AffectedSOPClassUID), and no context can be proposed.
NO_SOP_CLASS = "no SOP Class UID in the archive's answer or file; no C-STORE can carry it"
NO_CONTEXT = "receiver accepted no presentation context for the SOP class"
# Proposed (after the stored syntaxes and uncompressed) so a receiver that takes only
# compressed data can still be served by recompressing losslessly.
LOSSLESS_COMPRESSED = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5")


# -- the receiving side -------------------------------------------------------------------


def store_delivery(rsp: Command) -> Delivery:
    """The engine's outcome of a C-STORE-RSP (PS3.4 B.2.3): Success completed, the
    warning statuses a warning, anything else failed."""
    status = int(rsp.get(0x0900, 0xFFFF))  # type: ignore[arg-type]
    if status == SUCCESS:
        return Delivery(Outcome.COMPLETED)
    if status in STORE_WARNINGS:
        return Delivery(Outcome.WARNING)
    return Delivery(Outcome.FAILED, f"receiver answered C-STORE status 0x{status:04X}")


class StoreSubOperations:
    """A receiver of C-STORE sub-operations, as the engine's `StoreTarget`.

    Subclasses say which contexts the receiver accepted (`contexts`), whether it was
    asked for a SOP class at all (`asked`), and how one C-STORE goes (`store`, raising
    RequestorError when the association is gone); here the engine's terms become
    presentation contexts and the C-STORE-RSP status an outcome.
    """

    def contexts(self, sop_class_uid: str) -> dict[str, int]:
        """Accepted transfer syntax -> presentation context id, for one SOP class."""
        raise NotImplementedError

    def asked(self, sop_class_uid: str) -> bool:
        """Whether the receiver was asked for the SOP class (accepted or not)."""
        raise NotImplementedError

    async def store(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DataSource) -> Command:
        """One C-STORE; returns its response, raises RequestorError when the association is gone."""
        raise NotImplementedError

    def syntaxes(self, sop_class_uid: str) -> list[str]:
        return list(self.contexts(sop_class_uid)) if sop_class_uid else []

    @property
    def preferred(self) -> tuple[str, ...]:
        return ()

    def offered(self, sop_class_uid: str) -> bool:
        # An instance naming no SOP class waits for nothing: no association can be
        # proposed for it either, and it fails here with NO_SOP_CLASS.
        return not sop_class_uid or self.asked(sop_class_uid)

    def refusal(self, sop_class_uid: str) -> str:
        return NO_CONTEXT if sop_class_uid else NO_SOP_CLASS

    async def send(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset: DataSource) -> Delivery:
        context_id = self.contexts(sop_class_uid)[transfer_syntax]
        try:
            rsp = await self.store(context_id, sop_class_uid, sop_instance_uid, dataset)
        except SourceUnreadable as exc:
            return Delivery(Outcome.FAILED, str(exc))
        except RequestorError as exc:
            raise TargetLost(str(exc)) from exc
        return store_delivery(rsp)


# -- counts and statuses --------------------------------------------------------------------


def command_fields(counts: Counts, with_remaining: bool) -> dict[int, int | str | tuple[int, ...]]:
    """The Number of Completed/Failed/Warning (and Remaining) Sub-operations."""
    values: dict[int, int | str | tuple[int, ...]] = {
        0x1021: counts.completed,
        0x1022: counts.failed,
        0x1023: counts.warning,
    }
    if with_remaining:
        values[0x1020] = counts.remaining
    return values


def final_status(counts: Counts, complete: bool = True) -> int:
    """The final status once the sub-operations are over (PS3.4 C.4.2.1.5, C.4.3.1.4).

    ``complete`` is False when the request could not be served whole although
    sub-operations ran (the search failed part-way): never Success then, but
    Warning when any sub-operation completed, else Refused 0xA702.
    """
    if complete and counts.failed == 0 and counts.warning == 0:
        return SUCCESS
    if counts.completed == 0 and counts.warning == 0:
        return OUT_OF_RESOURCES_SUBOPS
    return WARNING


def failed_identifier(counts: Counts) -> Dataset | None:
    """The final response identifier: Failed SOP Instance UID List, when any failed."""
    if not counts.failed_uids:
        return None
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = counts.failed_uids if len(counts.failed_uids) > 1 else counts.failed_uids[0]
    return ds


# -- what a move destination is asked for ----------------------------------------------------


def proposals(
    refs: list[InstanceRef], first: list[Fetched], preferred: Sequence[str] = ()
) -> list[tuple[str, list[str]]]:
    """Presentation contexts for a move destination, at most 128.

    First, per SOP class, one context for each of the destination's ``preferred``
    syntaxes (a peer's ``transfer_syntaxes``), alone, so it can accept exactly those.
    Then one context per SOP class offering Explicit and Implicit VR Little Endian (every
    receiver takes one of them, and every syntax we decode converts to them), then one
    per stored syntax seen among the first fetched instances, alone, so the receiver
    can accept exactly it and the instance goes untouched; then lossless compressed
    syntaxes for receivers that want compression.
    The archive's search answers do not say how instances are stored, hence the look
    at the first fetched instances; a later instance in another syntax is converted.
    """
    classes = list(dict.fromkeys([r.sop_class_uid for r in refs if r.sop_class_uid] + [f.sop_class_uid for f in first if f.sop_class_uid]))
    stored: dict[str, list[str]] = {}
    for f in first:
        if f.sop_class_uid and f.transfer_syntax:
            stored.setdefault(f.sop_class_uid, [])
            if f.transfer_syntax not in stored[f.sop_class_uid]:
                stored[f.sop_class_uid].append(f.transfer_syntax)
    out: list[tuple[str, list[str]]] = [(c, [ts]) for c in classes for ts in preferred]
    out += [(c, list(UNCOMPRESSED)) for c in classes]
    out += [(c, [ts]) for c in classes for ts in stored.get(c, [])]
    out += [(c, list(LOSSLESS_COMPRESSED)) for c in classes]
    return out[:128]


# -- the service, C-MOVE and C-GET alike ----------------------------------------------------


class _Receivers:
    """The receiving associations of one request, opened in turn by the engine.

    A new one releases the previous ones first, since a destination may take one
    association at a time (storescp without --fork does). ``opening`` tells a C-CANCEL
    that sub-operations may be under way, to wait for the one in progress.
    """

    def __init__(self, service: RetrieveService, assoc: Association, message: Message) -> None:
        self.service = service
        self.assoc = assoc
        self.message = message
        self.opening = False
        self.closers: list[Callable[[], Awaitable[None]]] = []

    async def open(self, first: list[Fetched], refs: list[InstanceRef]) -> StoreTarget:
        self.opening = True
        await self.close()
        try:
            target, close = await self.service.open_target(self.assoc, self.message, refs, first)
        except RequestorError as exc:
            raise TargetLost(str(exc)) from exc
        self.closers.append(close)
        return target

    async def close(self) -> None:
        """Release every association opened so far (again, harmlessly, for old ones)."""
        for close in self.closers:
            with contextlib.suppress(Exception):
                await close()


class RetrieveService:
    """What C-MOVE and C-GET share: identifier, search, run, statuses.

    Subclasses say where the sub-operations go (`open_target`) and what may refuse
    the request before anything is searched (`precheck`).
    """

    name = ""
    rsp_field = 0

    def __init__(self, config: Config, retriever: Retriever) -> None:
        self.config = config
        self.retriever = retriever

    def precheck(self, assoc: Association, message: Message) -> tuple[int, str] | None:
        """A (status, comment) refusal before searching, or None."""
        return None

    async def open_target(
        self, assoc: Association, message: Message, refs: list[InstanceRef], first: list[Fetched]
    ) -> tuple[StoreSubOperations, Callable[[], Awaitable[None]]]:
        """The receiver of the sub-operations and how to close it afterwards; raises
        RequestorError when it cannot be opened."""
        raise NotImplementedError

    def destination(self, assoc: Association, message: Message) -> Participant:
        """Where the sub-operations go, as the audit trail names it."""
        raise NotImplementedError

    def _audit(self, receivers: _Receivers, listing: Listing, counts: Counts) -> None:
        """One audit message per request: the studies of what was listed and not
        failed, sent to the destination at the requestor's asking."""
        assoc = receivers.assoc
        if not assoc.audit.enabled:
            return
        failed = set(counts.failed_uids)
        tally = tally_of((r.study_uid, r.sop_class_uid) for r in listing.refs.values() if r.sop_instance_uid not in failed)
        assoc.audit.sent(
            assoc.participant(), self.destination(assoc, receivers.message),
            tally, counts.completed + counts.warning, counts.failed + counts.remaining,
            f"{self.name}: {counts.completed} completed, {counts.warning} warning, {counts.failed} failed",
        )

    async def __call__(self, assoc: Association, message: Message) -> None:
        command, context = message.command, message.context
        started = time.monotonic()
        what = f"{self.name} from {assoc.peer}"

        async def send(status: int, identifier: Dataset | None = None, extra: dict[int, int | str | tuple[int, ...]] | None = None) -> None:
            body = None if identifier is None else encode_identifier(identifier, context.transfer_syntax)
            rsp = response(command, self.rsp_field, status, has_dataset=body is not None, extra=extra)
            await assoc.send_message(context.id, rsp, body)

        refusal = self.precheck(assoc, message)
        if refusal is not None:
            log.warning("%s refused: %s", what, refusal[1])
            await send(refusal[0], extra={0x0902: refusal[1][:64]})
            return
        try:
            try:
                identifier = decode_identifier(message.dataset or b"", context.transfer_syntax)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the peer's malformed identifier
                raise RetrieveError(f"unreadable identifier ({type(exc).__name__})", UNABLE_TO_PROCESS) from exc
            request = parse_retrieve_identifier(identifier, context.abstract_syntax in STUDY_ROOT_CLASSES)
        except Exception as exc:  # noqa: BLE001 - every failure must end the request with a status
            await self._refuse(send, what, exc)
            return
        request = await self.retriever.located(request)  # C-CANCEL meanwhile: answered by dispatch
        feed = self.retriever.bulk(request, what)
        listing = self.retriever.listing(request, feed)
        try:
            await self._retrieve(_Receivers(self, assoc, message), listing, feed, send, what, started)
        finally:
            await listing.close()
            if feed is not None:
                await feed.close()

    async def _refuse(self, send: Callable[..., Awaitable[None]], what: str, exc: Exception) -> None:
        """End a request that failed before any sub-operation with its status."""
        failure = failure_status(exc)
        if failure.internal:
            log.exception("%s failed", what)
        log.warning("%s failed before any sub-operation: 0x%04X %s", what, failure.status, failure.comment)
        extra: dict[int, int | str | tuple[int, ...]] = {0x0902: failure.comment[:64]}
        if isinstance(exc, RetrieveError) and exc.offending:
            extra[0x0901] = exc.offending
        await send(failure.status, extra=extra)

    async def _retrieve(
        self,
        receivers: _Receivers,
        listing: Listing,
        feed: BulkFeed | None,
        send: Callable[..., Awaitable[None]],
        what: str,
        started: float,
    ) -> None:
        """Run the sub-operations as the search lists them, send the final response."""
        cancelled = asyncio.Event()

        async def report(counts: Counts) -> None:
            await send(PENDING, extra=command_fields(counts, True))

        worker = asyncio.create_task(self.retriever.run(listing, receivers.open, report, cancelled, what, feed))
        interrupted = False
        try:
            try:
                counts = await asyncio.shield(worker)
            except asyncio.CancelledError:
                # C-CANCEL (or the requester went away): stop between sub-operations,
                # or at once while nothing is being sent yet.
                interrupted = True
                cancelled.set()
                if receivers.opening:
                    counts = await worker
                else:
                    worker.cancel()
                    await asyncio.wait([worker])
                    counts = Counts() if worker.cancelled() else worker.result()
        except TargetLost as exc:
            await listing.complete()
            counts = Counts(total=len(listing.refs) + listing.unknown(), failed=listing.unknown())
            for ref in listing.refs.values():
                counts.fail(ref.sop_instance_uid)
            log.warning("%s: cannot open the receiving association: %s", what, exc)
        except Exception as exc:
            if exc is not listing.error:
                raise
            await self._refuse(send, what, exc)
            return
        except BaseException:
            worker.cancel()
            raise
        finally:
            await receivers.close()
        elapsed = time.monotonic() - started
        extra = command_fields(counts, False)
        if interrupted or cancelled.is_set():
            status = CANCEL
            extra = command_fields(counts, True)
        elif listing.error is not None:
            # Cut short after sub-operations began: 0xA701 would say none ran. Every
            # instance it listed has been sent or counted failed (with its UID) by now,
            # since the engine goes through all of them; what it never listed is unknown
            # to us (counted failed, without a UID, when the archive's count says how
            # many), so the request ends in Warning (or 0xA702 when nothing completed)
            # with the counts, and the comment says the search failed.
            status = final_status(counts, complete=False)
            comment = failure_status(listing.error).comment
            extra[0x0902] = f"search failed after {len(listing.refs)} listed: {comment}"[:64]
            log.warning("%s: search failed after listing %d instances: %s", what, len(listing.refs), comment)
        else:
            status = final_status(counts)
        log.info(
            "%s: %d instances (%d in bulk), %d completed, %d failed, %d warning, %d transcoded, %d not sent, over %d association(s), 0x%04X, %.2f s",
            what, counts.total, counts.bulk, counts.completed, counts.failed, counts.warning, counts.transcoded,
            counts.remaining, len(receivers.closers), status, elapsed,
            extra={"fields": {
                "event": "operation", "operation": self.name, "calling_ae": receivers.assoc.calling_ae,
                "instances": counts.total, "completed": counts.completed, "failed": counts.failed,
                "warning": counts.warning, "transcoded": counts.transcoded, "status": f"0x{status:04X}",
                "seconds": round(elapsed, 3),
            }},
        )
        self._audit(receivers, listing, counts)
        with contextlib.suppress(Exception):
            await send(status, failed_identifier(counts), extra)
        if interrupted:
            raise asyncio.CancelledError()
