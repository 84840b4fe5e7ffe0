"""Route senders: the copies `[[dimse.routes]]` make, sent on by C-STORE.

One task per destination claims its due copies (`gateway.spool.copies`), a batch at a
time, and sends them over an association it requests from the gateway's AE title to
the peer's address, proposing each SOP class with the syntaxes the batch is stored in
and the uncompressed ones. The association stays open while copies keep coming (a
modality sending a study makes many small batches) and is released once the queue is
empty, or replaced when a batch brings a SOP class or syntax it was not proposed. An instance goes as stored when the destination accepts
that syntax, otherwise converted as for a C-MOVE (`Transcoder`, lossless unless
``retrieve.allow_lossy``). Each record is checked against its checksum first, as
before a delivery to the archive.

What the destination answers decides each copy: Success or a warning delivers it;
out of resources (0xA7xx), a processing failure (0x0110), an association refused,
lost or never answered waits and is tried again with the spool's backoff; any other
failure status, or no presentation context for its SOP class, makes it ``dead`` at
once with the status in its reason (for ``spool retry`` once the destination is fixed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from gateway.codecs import TranscodeError
from gateway.audit.auditor import Auditor, StudyTally, dimse_participant
from gateway.config import Config
from gateway.dimse.requestor import RequestorError, StoreRequestor
from gateway.dimse.retrieve import STORE_WARNINGS, proposals
from gateway.metrics import Metrics
from gateway.part10 import META_HEAD, read_file_meta
from gateway.retrieval.request import InstanceRef
from gateway.retrieval.source import Fetched
from gateway.retrieval.transcode import Transcoder
from gateway.spill import SpillFull
from gateway.spool.copies import Copies, SpooledCopy
from gateway.spool.queue import Spool
from gateway.upstream.base import Retrieved

log = logging.getLogger("gateway.routing")

BATCH = 32  # copies per association
IDLE_POLL = 5.0  # seconds between looks at the queue (`spool retry` runs in another process)
TRANSIENT = frozenset({0x0110, 0x0213})  # processing failure, resource limitation


def _outcome(status: int) -> tuple[str, str]:
    """(kind, reason) of a C-STORE-RSP status for a copy (PS3.4 B.2.3)."""
    if status == 0x0000 or status in STORE_WARNINGS:
        return "delivered", ""
    reason = f"destination answered C-STORE status 0x{status:04X}"
    if status in TRANSIENT or 0xA700 <= status <= 0xA7FF:
        return "retry", reason
    return "refused", reason


def _fetched(copy: SpooledCopy) -> Fetched:
    """The spool record as the send pipeline's `Fetched`: its File Meta read, the data
    set sent from the file (blocking: a worker thread)."""
    inst = copy.instance
    retrieved = Retrieved(None, inst.path, 0, inst.size, transfer_syntax=inst.transfer_syntax)
    meta = read_file_meta(retrieved.read(0, META_HEAD))
    ref = InstanceRef(inst.study_uid, inst.series_uid, inst.sop_instance_uid, inst.sop_class_uid)
    return Fetched(ref, retrieved, meta.transfer_syntax, inst.sop_class_uid, meta.dataset_offset)


@dataclass
class _Open:
    """An association kept open to a destination, and what it was proposed."""

    requestor: StoreRequestor
    proposed: frozenset[tuple[str, str]]  # (SOP class, transfer syntax)


class RouteSenders:
    """The daemon's senders of routed copies, one task per destination."""

    def __init__(
        self, config: Config, spool: Spool, transcoder: Transcoder, metrics: Metrics | None = None,
        audit: Auditor | None = None,
    ) -> None:
        """``config`` is replaced on reload (peer addresses), and `reconfigure` then
        starts a sender for a destination a new route names. ``audit``: the audit
        trail, told of each batch copied."""
        self.config = config
        self.audit = audit
        self.spool = spool
        self.copies = Copies(spool)
        self.transcoder = transcoder
        self.metrics = metrics
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._open: dict[str, _Open] = {}

    def start(self) -> None:
        self.reconfigure()

    def reconfigure(self) -> None:
        """A sender for every destination the routes name. One whose route is gone keeps
        its sender: copies already queued for it are still owed."""
        for destination in sorted({r.destination for r in self.config.dimse.routes} - set(self._wake)):
            self._wake[destination] = asyncio.Event()
            self._tasks.append(asyncio.create_task(self._run(destination), name=f"route-{destination}"))

    def wake(self) -> None:
        """Something was queued: look now instead of at the next poll."""
        for event in self._wake.values():
            event.set()

    async def stop(self, grace: float) -> None:
        """Let a batch in hand finish within ``grace``, then cancel (its copies go back)."""
        self._stopping = True
        self.wake()
        if not self._tasks:
            return
        _, pending = await asyncio.wait(self._tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, destination: str) -> None:
        try:
            await self._loop(destination)
        finally:
            await self._close(destination, abort=True)

    async def _close(self, destination: str, abort: bool = False) -> None:
        """End the association kept open to ``destination``, if any."""
        kept = self._open.pop(destination, None)
        if kept is not None:
            if abort or kept.requestor.closed:
                await kept.requestor.abort()
            else:
                await kept.requestor.release()

    async def _loop(self, destination: str) -> None:
        event = self._wake[destination]
        while not self._stopping:
            try:
                event.clear()  # before looking: a wake-up while we look is not lost
                batch = await asyncio.to_thread(self.copies.claim, destination, BATCH)
                if not batch:
                    await self._close(destination)
                    due = await asyncio.to_thread(self.copies.next_due_in, destination)
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(event.wait(), IDLE_POLL if due is None else min(due + 0.05, IDLE_POLL))
                    continue
                try:
                    outcomes = await self._send(destination, batch)
                except BaseException:
                    # Stopping, or a fault: the copies go back to the queue untouched.
                    await asyncio.shield(asyncio.to_thread(self.copies.release, batch))
                    raise
                states = await self._record(destination, outcomes)
                self._report(destination, outcomes, states)
                if "delivered" in states.values() and self.spool.cfg.retain_delivered_hours == 0:
                    # The archive's forwarder purged what it delivered at once, except
                    # files a copy still needed: those go now.
                    await asyncio.to_thread(self.spool.purge_delivered, 0.0)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a spool error must not end the route for good
                log.exception("route to %s: unexpected error; trying again shortly", destination)
                await asyncio.sleep(5)

    async def _record(self, destination: str, outcomes: list[tuple[SpooledCopy, str, str]]) -> dict[int, str]:
        """Record what the destination said, retrying until the spool database takes
        it: the copies are sent, and releasing them would need that same database."""
        pause = 0.5
        while True:
            try:
                return await asyncio.shield(asyncio.to_thread(self.copies.record, outcomes))
            except Exception as exc:  # noqa: BLE001 - the outcome must not be lost
                log.error("route to %s: cannot record %d outcomes (%s: %s); retrying", destination, len(outcomes), type(exc).__name__, exc)
            await asyncio.sleep(pause)
            pause = min(pause * 2, IDLE_POLL)

    def _report(self, destination: str, outcomes: list[tuple[SpooledCopy, str, str]], states: dict[int, str]) -> None:
        counts = {"delivered": 0, "failed": 0, "dead": 0, "withdrawn": 0}
        copied = StudyTally()
        for copy, _, error in outcomes:
            state = states.get(copy.id, "failed")
            counts[state] += 1
            if state == "delivered":
                copied.add(copy.instance.study_uid, copy.instance.sop_class_uid)
            if self.metrics is not None:
                self.metrics.route_copies.labels(destination, state).inc()
            if state == "dead":
                log.error("route to %s: instance %s not copied: %s", destination, copy.instance.sop_instance_uid, error)
            elif state == "withdrawn":
                log.info(
                    "route to %s: instance %s not copied (%s) and not tried again: its study was discarded meanwhile",
                    destination, copy.instance.sop_instance_uid, error,
                )
        if self.audit is not None:
            peer = self.config.peer(destination)
            self.audit.pushed(
                dimse_participant(destination, peer.host if peer is not None else "", False), copied,
                counts["delivered"], counts["dead"], f"route copies to {destination}",
            )
        if counts["failed"]:
            first = next(e for c, k, e in outcomes if states.get(c.id) == "failed")
            log.warning(
                "route to %s: %d copied, %d wait for another attempt (%s), %d dead",
                destination, counts["delivered"], counts["failed"], first, counts["dead"],
            )
        else:
            log.debug("route to %s: %d copied, %d dead", destination, counts["delivered"], counts["dead"])

    def _prepare(
        self, batch: list[SpooledCopy]
    ) -> tuple[list[tuple[SpooledCopy, Fetched]], list[tuple[SpooledCopy, str, str]]]:
        """The records that can go, each checked against its checksum and its File Meta
        read, and the outcomes of those that cannot (one worker-thread trip a batch)."""
        bad = self.spool.check([c.instance for c in batch])
        ready: list[tuple[SpooledCopy, Fetched]] = []
        refused: list[tuple[SpooledCopy, str, str]] = []
        for copy in batch:
            if copy.instance.id in bad:
                refused.append((copy, "refused", bad[copy.instance.id]))
                continue
            try:
                ready.append((copy, _fetched(copy)))
            except (OSError, ValueError) as exc:
                refused.append((copy, "refused", f"spool record unreadable: {exc}"))
        return ready, refused

    async def _send(self, destination: str, batch: list[SpooledCopy]) -> list[tuple[SpooledCopy, str, str]]:
        """Send one batch over one association; what became of each copy."""
        ready, outcomes = await asyncio.to_thread(self._prepare, batch)
        if not ready:
            return outcomes
        peer = self.config.peer(destination)
        if peer is None:
            return outcomes + [(c, "retry", f"{destination} is no longer a configured peer") for c, _ in ready]
        wanted = {(f.sop_class_uid, f.transfer_syntax) for _, f in ready}
        kept = self._open.get(destination)
        if kept is not None and (kept.requestor.closed or not wanted <= kept.proposed):
            await self._close(destination)
            kept = None
        if kept is None:
            contexts = proposals([], [f for _, f in ready], peer.transfer_syntaxes)
            try:
                requestor = await StoreRequestor.to_peer(self.config, peer, contexts)
            except RequestorError as exc:
                return outcomes + [(c, "retry", str(exc)) for c, _ in ready]
            kept = self._open[destination] = _Open(requestor, frozenset((c, t) for c, ts in contexts for t in ts))
        requestor = kept.requestor
        lost = ""
        try:
            for copy, item in ready:
                if lost:
                    outcomes.append((copy, "retry", lost))
                    continue
                try:
                    outcomes.append((copy, *await self._store(requestor, item, peer.transfer_syntaxes)))
                except RequestorError as exc:
                    lost = f"association to {destination} lost: {exc}"
                    outcomes.append((copy, "retry", lost))
        finally:
            for _, item in ready:
                item.release()
            if lost or requestor.closed:
                await self._close(destination, abort=True)
        return outcomes

    async def _store(self, requestor: StoreRequestor, item: Fetched, preferred: tuple[str, ...]) -> tuple[str, str]:
        """One C-STORE of one copy, as stored or converted (to the destination's
        ``preferred`` syntaxes first); (kind, reason)."""
        accepted = list(requestor.accepted.get(item.sop_class_uid, {}))
        if not accepted:
            return "refused", f"destination accepted no presentation context for SOP class {item.sop_class_uid}"
        try:
            syntax, dataset, spilled = await self.transcoder.for_receiver(item, accepted, preferred)
        except SpillFull as exc:  # room comes back: tried again later
            return "retry", f"cannot convert for the destination: {exc.strerror}"
        except TranscodeError as exc:
            return "refused", f"cannot convert for the destination: {exc}"
        except Exception as exc:  # noqa: BLE001 - a codec crash fails this copy only
            return "refused", f"cannot convert for the destination: {type(exc).__name__}: {exc}"
        try:
            rsp = await requestor.store(requestor.accepted[item.sop_class_uid][syntax], item.sop_class_uid, item.ref.sop_instance_uid, dataset)
        finally:
            if spilled is not None:
                spilled.unlink(missing_ok=True)
        return _outcome(int(rsp.get(0x0900, 0xFFFF)))  # type: ignore[arg-type]
