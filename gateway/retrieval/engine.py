"""The retrieval engine: every instance a request names, fetched and sent in order.

A request becomes a list of instances (`Listing`: the bulk answers checked against
the archive's count, or QIDO searches, in a task of its own), and a pipeline that
starts with the first answers:
up to ``retrieve.fetch_concurrency`` instances are fetched from the upstream at once,
at most twice that many wait fetched, and they go to the receiver strictly in order,
one at a time, while the search goes on. Instances of a SOP class not seen (fetched
or listed) when the receiver was opened go last, to a second one. A fetched instance
above ``retrieve.spill_mb`` waits in a file under ``<spool>/retrieve``, so memory
stays bounded by the window (and the look-ahead before the first send) whatever the
study size; near the spool disk's floor, fetching waits for the instances ahead to be
sent, and the look-ahead ends early (`gateway.spill`). A STUDY or SERIES request
whose study is named is read in bulk as well (`BulkFeed`).

An instance goes as it is stored when the receiver accepts that transfer syntax (its
bytes untouched, never parsed); otherwise it is converted (`Transcoder`). Counters
feed the front's progress reports, made at least every ``pending_every`` instances or
``pending_seconds``. A cancellation takes effect between instances: the one being
sent completes and is counted.

The receiver is a `StoreTarget`, which a front implements (a C-MOVE destination, a
C-GET requester, a WADO-RS response); the front turns the `Counts` into its statuses.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from gateway.codecs import TranscodeError
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.retrieval.bulk import BulkFeed, bulk_scopes
from gateway.retrieval.listing import Listing, as_studies, search_instances, with_study
from gateway.retrieval.request import InstanceRef, RetrieveRequest
from gateway.retrieval.source import DataSource, Fetched, inspect
from gateway.retrieval.transcode import ByteBudget, Transcoder
from gateway.spill import ROOM_POLL, SpillArea, SpillFull
from gateway.upstream.base import ANY_SYNTAX, Upstream
from gateway.upstream.errors import NotFound, UpstreamError, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger("gateway.retrieval")

# Instances fetched before the receiver is opened, so that it can be asked for the
# syntaxes they are stored in (the archive's search answers do not say).
LOOKAHEAD_INSTANCES = 64
LOOKAHEAD_BYTES = 64 << 20  # of in-memory instances; spilled ones cost no memory


# -- the receiving side ---------------------------------------------------------------------


class Outcome(enum.Enum):
    """What the receiver made of one instance."""

    COMPLETED = "completed"
    WARNING = "warning"  # taken, with a warning (e.g. coerced or elements discarded)
    FAILED = "failed"


@dataclass(frozen=True)
class Delivery:
    """The receiver's answer to one instance; ``reason`` says why it failed (for the
    log: never attribute values)."""

    outcome: Outcome
    reason: str = ""


class TargetLost(Exception):
    """The receiver could not be opened or has gone away: the instance being sent and
    every later one for it fail."""


class StoreTarget(Protocol):
    """Where the instances go, one at a time, in order."""

    def syntaxes(self, sop_class_uid: str) -> Sequence[str]:
        """The transfer syntaxes the receiver takes for the SOP class, best first;
        empty when it takes none."""
        ...

    @property
    def preferred(self) -> Sequence[str]:
        """The receiver's own order of transfer syntaxes to be sent (a configured
        peer's ``transfer_syntaxes``); empty: as stored when it takes that."""
        ...

    def offered(self, sop_class_uid: str) -> bool:
        """False when an instance of the SOP class should rather wait for a receiver
        opened for it (the classes set aside), as one not asked for that class."""
        ...

    def refusal(self, sop_class_uid: str) -> str:
        """Why the receiver takes no syntax for the SOP class: the reason an instance of
        it fails with."""
        ...

    async def send(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, dataset: DataSource) -> Delivery:
        """Hand over one data set, encoded in ``transfer_syntax`` (one of `syntaxes`);
        raises TargetLost when the receiver is gone."""
        ...


# The front's way to open a receiver: called with the instances fetched so far and
# what the search has listed, so it can ask for the SOP classes and syntaxes seen.
OpenTarget = Callable[[list[Fetched], list[InstanceRef]], Awaitable[StoreTarget]]


@dataclass
class Counts:
    """What became of a retrieval's instances so far."""

    total: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)
    transcoded: int = 0
    bulk: int = 0  # instances that came in a series or study answer, not alone

    @property
    def remaining(self) -> int:
        return self.total - self.completed - self.failed - self.warning

    def fail(self, uid: str) -> None:
        self.failed += 1
        self.failed_uids.append(uid)


# -- the engine -------------------------------------------------------------------------------


class Retriever:
    """What every retrieval shares, bound once (no globals): the upstream, the spill
    directory, the codec threads and their memory budget."""

    def __init__(self, config: Config, upstream: Upstream, metrics: Metrics | None = None) -> None:
        """``metrics``: where conversions for receivers are counted."""
        self.upstream = upstream
        directory = config.spool.directory / "retrieve"
        # Spill files of a previous run are orphans: nothing can still be sending them.
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, exist_ok=True)
        self.spill_area = SpillArea(directory)
        self.config = config
        self.spill_bytes = int(config.retrieve.spill_mb * 1024 * 1024)
        self.codecs = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="retrieve-codec")
        budget = ByteBudget(int(config.retrieve.transcode_mb * 1024 * 1024))
        self.transcoder = Transcoder(self.codecs, budget, config.retrieve.allow_lossy, self.spill_area, self.spill_bytes, metrics)

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """Also keeps the spill area's floor at ``spool.min_free_mb`` (a reload may change it)."""
        self._config = config
        self.spill_area.min_free = config.spool.min_free_mb * 1024 * 1024

    def close(self) -> None:
        self.codecs.shutdown(wait=False, cancel_futures=True)

    async def located(self, request: RetrieveRequest) -> RetrieveRequest:
        """The request in the terms the archive reads in bulk, where one search finds
        them: a series with its study (`with_study`), a patient as its studies
        (`as_studies`)."""
        caps = self.upstream.capabilities
        if request.level == "SERIES" and caps.series_retrieve:
            return await with_study(self.upstream, request)
        if request.level == "PATIENT" and caps.study_retrieve:
            return await as_studies(self.upstream, request)
        return request

    def listing(self, request: RetrieveRequest, feed: BulkFeed | None = None) -> Listing:
        """Start finding out what the request's instances are: counted when ``feed``
        reads them in bulk, searched otherwise."""
        return Listing(self.upstream, request, feed.scopes if feed is not None else ())

    def bulk(self, request: RetrieveRequest, what: str) -> BulkFeed | None:
        """Start reading the request's series or studies whole, or None when it names
        neither with its study (the series of a study not named, single instances)."""
        scopes = bulk_scopes(request, self.upstream.capabilities)
        if scopes is None:
            return None
        return BulkFeed(self.upstream, scopes, self.spill_area, self.spill_bytes, LOOKAHEAD_INSTANCES, LOOKAHEAD_BYTES, what)

    async def fetch(self, ref: InstanceRef) -> Fetched:
        """Fetch one instance and read its File Meta; never raises (the error is kept)."""
        item = Fetched(ref)
        try:
            item.retrieved = await self.upstream.retrieve_instance(
                ref.study_uid, ref.series_uid, ref.sop_instance_uid, self.spill_area, self.spill_bytes,
                acceptable=ANY_SYNTAX,
            )
            ts, sop_class, _, offset = await inspect(item.retrieved, ref.study_uid, ref.series_uid, ref.sop_instance_uid)
            item.transfer_syntax, item.dataset_offset = ts, offset
            item.sop_class_uid = sop_class or ref.sop_class_uid
        except NotFound:
            item.error = "not found in the archive"
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            item.error = str(exc)
        except SpillFull as exc:
            item.error = str(exc.strerror)
        except (ValueError, OSError) as exc:
            item.error = f"unusable instance: {exc}"
        if item.error:
            item.release()
        return item

    async def run(
        self,
        listing: Listing,
        open_target: OpenTarget,
        report: Callable[[Counts], Awaitable[None]],
        cancelled: asyncio.Event,
        what: str,
        feed: BulkFeed | None = None,
    ) -> Counts:
        """Fetch and send every instance ``listing`` lists; returns the counts
        (``cancelled`` stops it between instances, leaving the rest in ``remaining``).

        See `Pipeline`. Raises the search's error if it failed before anything was
        sent, and TargetLost if the first receiver cannot be opened at all.
        """
        return await Pipeline(self, listing, open_target, report, cancelled, what, feed).run()


class Pipeline:
    """One retrieval, from its listing to the last instance sent.

    Sending starts with the first answers: instances come from ``feed`` first, each
    once it is due (`Listing.admit`), then the listed ones it did not bring are
    fetched one by one (a producer task queues them, in order, behind a window of
    ``2 * fetch_concurrency``). ``open_target`` is called with the first
    LOOKAHEAD_INSTANCES fetched instances (fewer if they hold LOOKAHEAD_BYTES) and
    what the search has listed by then. An instance of a SOP class that receiver was
    not asked for (listed later) is set aside and fetched again at the end, for a
    second ``open_target`` call with the set-aside ones (the first receiver is done
    with by then). Progress reports wait until the number due is known (the count,
    or the end of the search). Every fetched instance is released on every path.
    """

    def __init__(
        self,
        retriever: Retriever,
        listing: Listing,
        open_target: OpenTarget,
        report: Callable[[Counts], Awaitable[None]],
        cancelled: asyncio.Event,
        what: str,
        feed: BulkFeed | None,
    ) -> None:
        self.retriever = retriever
        self.listing = listing
        self.open_target = open_target
        self.report = report
        self.cancelled = cancelled
        self.what = what
        self.feed = feed
        self.settings = retriever.config.retrieve
        self.counts = Counts()
        self._gate = asyncio.Semaphore(self.settings.fetch_concurrency)
        self._queue: asyncio.Queue[asyncio.Future[Fetched] | None] = asyncio.Queue(maxsize=2 * self.settings.fetch_concurrency)
        self._fetches: set[asyncio.Task[Fetched]] = set()
        self._producer: asyncio.Task[None] | None = None
        self._ahead: deque[asyncio.Future[Fetched]] = deque()  # fetched before the receiver opened
        self._deferred: list[Fetched] = []  # File Meta of the set-aside instances, no data
        self._first_error = ""  # the first failure's reason, logged once
        self._broken = ""  # why the receiver went away, if it did
        self._last_report = time.monotonic()
        self._since = 0  # instances since the last report
        self._queued = 0  # instances put in the send order so far
        self._finished = 0  # ... and those the sender is done with
        self._paused = False  # fetching waited for room on the disk (said once)

    async def run(self) -> Counts:
        """Look ahead, open the receiver, send in order, then what was set aside."""
        self._producer = asyncio.create_task(self._produce())
        try:
            first = await self._fill_look_ahead()
            if self.cancelled.is_set():
                return self.counts
            if not first and self.listing.error is not None:
                raise self.listing.error
            if not first:
                return self.counts  # nothing to send: no receiver to open
            target = await self.open_target(first, list(self.listing.refs.values()))
            if await self._send_in_order(target):
                await self._send_set_aside()
                self.counts.failed += self.listing.unknown()
            return self.counts
        finally:
            await self._clean_up()

    # ---- producing: what to send, in order ---------------------------------------------------

    async def _produce(self) -> None:
        """Queue the instances to send, in order, then None for the end."""
        delivered = await self._queue_bulk() if self.feed is not None else set()
        self.listing.bulk_over()
        await self.listing.complete()
        await self._queue_fetches(delivered)
        await self._queue.put(None)

    async def _queue_bulk(self) -> set[str]:
        """Queue the bulk answers' instances, each due as it comes (`Listing.admit`);
        returns their UIDs."""
        assert self.feed is not None
        delivered: set[str] = set()
        loop = asyncio.get_running_loop()
        async for item in self.feed:
            uid = item.ref.sop_instance_uid
            if uid in delivered:
                item.release()  # the answer repeats it
                continue
            self.listing.admit(item.ref)
            delivered.add(uid)
            self.counts.bulk += 1
            arrived: asyncio.Future[Fetched] = loop.create_future()
            arrived.set_result(item)
            try:
                await self._queue.put(arrived)
            except asyncio.CancelledError:
                item.release()
                raise
            self._queued += 1
        return delivered

    async def _queue_fetches(self, delivered: set[str]) -> None:
        """Fetch, ``fetch_concurrency`` at a time, what the search listed and the bulk
        answers did not bring."""
        for ref in list(self.listing.refs.values()):
            if ref.sop_instance_uid in delivered:
                continue
            task = asyncio.create_task(self._fetch_gated(ref, self._queued))
            self._queued += 1
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)
            await self._queue.put(task)

    async def _fetch_gated(self, ref: InstanceRef, turn: int) -> Fetched:
        """Fetch the ``turn``-th instance of the send order; near the disk's floor, not
        before those ahead of it are sent (`SpillArea.room`)."""
        if await self.retriever.spill_area.room(lambda: self._finished < turn) and not self._paused:
            self._paused = True
            log.info("%s: fetching ahead paused while the spool's disk is near spool.min_free_mb", self.what)
        async with self._gate:
            return await self.retriever.fetch(ref)

    # ---- sending ------------------------------------------------------------------------------

    async def _fill_look_ahead(self) -> list[Fetched]:
        """The first instances, fetched before the receiver is opened (they stay queued
        in ``_ahead`` for sending)."""
        first: list[Fetched] = []
        held = 0
        area = self.retriever.spill_area
        while len(self._ahead) < LOOKAHEAD_INSTANCES and held < LOOKAHEAD_BYTES:
            if first and area.near_floor():
                break  # near the disk's floor: open the receiver with what came, and send
            if first and self._queue.empty():
                try:
                    task = await asyncio.wait_for(self._queue.get(), ROOM_POLL)
                except TimeoutError:
                    continue
            else:
                task = await self._queue.get()
            if task is None:
                self._queue.put_nowait(None)
                break
            self._ahead.append(task)
            first.append(await task)
            r = first[-1].retrieved
            held += r.length if r is not None and r.data is not None else 0
        return first

    async def _send_in_order(self, target: StoreTarget) -> bool:
        """Send every queued instance, setting aside those ``target`` was not asked
        for; False when cancelled before the end."""
        while True:
            task = self._ahead.popleft() if self._ahead else await self._queue.get()
            if task is None:
                return True
            item = await task
            if not item.error and not self._broken and not target.offered(item.sop_class_uid):
                self._set_aside(item)
                self._finished += 1
                continue
            await self._deliver(target, item)
            self._finished += 1
            if self.cancelled.is_set():
                return False

    def _set_aside(self, item: Fetched) -> None:
        """Keep what is needed to fetch it again later, release its data now (memory
        stays bounded however many are set aside)."""
        self._deferred.append(Fetched(item.ref, transfer_syntax=item.transfer_syntax, sop_class_uid=item.sop_class_uid))
        item.release()

    async def _locate(self, deferred: list[Fetched]) -> None:
        """Fill in the series of set-aside instances a study's bulk answer brought
        (fetching one alone needs it, and that answer does not say it): one search
        per study for those instances. One it does not find keeps no series, and
        its fetch fails (counted failed)."""
        unknown: dict[str, list[str]] = {}
        for info in deferred:
            if not info.ref.series_uid:
                unknown.setdefault(info.ref.study_uid, []).append(info.ref.sop_instance_uid)
        found: dict[str, str] = {}
        for study, uids in unknown.items():
            request = RetrieveRequest("IMAGE", study_uids=(study,), sop_uids=tuple(uids))
            try:
                async for ref in search_instances(self.retriever.upstream, request):
                    found[ref.sop_instance_uid] = ref.series_uid
            except UpstreamError as exc:
                log.warning("%s: cannot find the series of %d set-aside instances: %s", self.what, len(uids), exc)
        for info in deferred:
            if not info.ref.series_uid and info.ref.sop_instance_uid in found:
                info.ref = replace(info.ref, series_uid=found[info.ref.sop_instance_uid])

    async def _send_set_aside(self) -> None:
        """The instances the first receiver was not asked for, to a second one, each
        fetched again one ahead of the one sending."""
        deferred = self._deferred
        if not deferred:
            return
        if self._broken:
            for info in deferred:
                self.counts.fail(info.ref.sop_instance_uid)
            return
        await self._locate(deferred)
        try:
            target = await self.open_target(deferred, [])
        except TargetLost as exc:
            log.warning("%s: cannot open the association for %d more instances: %s", self.what, len(deferred), exc)
            for info in deferred:
                self.counts.fail(info.ref.sop_instance_uid)
            return
        fetch = self.retriever.fetch
        nxt: asyncio.Task[Fetched] | None = asyncio.create_task(fetch(deferred[0].ref))
        try:
            for index in range(len(deferred)):
                assert nxt is not None
                item = await nxt
                nxt = asyncio.create_task(fetch(deferred[index + 1].ref)) if index + 1 < len(deferred) else None
                await self._deliver(target, item)
                if self.cancelled.is_set():
                    return
        finally:
            if nxt is not None:
                nxt.cancel()
                result = (await asyncio.gather(nxt, return_exceptions=True))[0]
                if isinstance(result, Fetched):
                    result.release()

    async def _deliver(self, target: StoreTarget, item: Fetched) -> None:
        """Send one instance (or count it failed), release it, then report if due."""
        try:
            if self._broken:
                self.counts.fail(item.ref.sop_instance_uid)
                return
            try:
                outcome = await self._send_one(target, item)
            except TargetLost as exc:
                self._broken = str(exc)
                sent = self.counts.completed + self.counts.failed + self.counts.warning
                log.warning("%s: receiver association lost after %d sub-operations: %s", self.what, sent, exc)
                self.counts.fail(item.ref.sop_instance_uid)
                return
            if outcome and not self._first_error:
                self._first_error = outcome
                log.warning("%s: sub-operation failed: %s", self.what, outcome)
        finally:
            item.release()
        self._since += 1
        await self._report_if_due()

    async def _send_one(self, target: StoreTarget, item: Fetched) -> str:
        """Send one instance, as stored or converted, updating the counts; returns a
        failure reason or ''."""
        counts = self.counts
        uid = item.ref.sop_instance_uid
        if item.error:
            counts.fail(uid)
            return item.error
        accepted = list(target.syntaxes(item.sop_class_uid))
        if not accepted:
            counts.fail(uid)
            return target.refusal(item.sop_class_uid)
        try:
            syntax, dataset, spilled = await self.retriever.transcoder.for_receiver(item, accepted, target.preferred)
        except SpillFull as exc:
            counts.fail(uid)
            return f"cannot transcode: {exc.strerror}"
        except TranscodeError as exc:
            counts.fail(uid)
            return f"cannot transcode: {exc}"
        except Exception as exc:  # noqa: BLE001 - a codec crash fails this instance only
            counts.fail(uid)
            return f"cannot transcode: {type(exc).__name__}: {exc}"
        if syntax != item.transfer_syntax:
            counts.transcoded += 1
        try:
            delivery = await target.send(item.sop_class_uid, uid, syntax, dataset)
        finally:
            if spilled is not None:
                spilled.unlink(missing_ok=True)
        if delivery.outcome is Outcome.COMPLETED:
            counts.completed += 1
            return ""
        if delivery.outcome is Outcome.WARNING:
            counts.warning += 1
            return ""
        counts.fail(uid)
        return delivery.reason or "refused by the receiver"

    async def _report_if_due(self) -> None:
        """A progress report every ``pending_every`` instances or ``pending_seconds``,
        once the number due is known."""
        now = time.monotonic()
        total = self.listing.total()
        if total is not None:
            self.counts.total = total
            if self.counts.remaining and (
                self._since >= self.settings.pending_every or now - self._last_report >= self.settings.pending_seconds
            ):
                await self.report(self.counts)
                self._last_report, self._since = now, 0

    async def _clean_up(self) -> None:
        """Stop the producer and every fetch, and release whatever they fetched."""
        total = self.listing.total()
        self.counts.total = len(self.listing.refs) if total is None else total
        self.listing.bulk_over()
        assert self._producer is not None
        self._producer.cancel()
        for task in list(self._fetches):
            task.cancel()
        leftovers = [*self._ahead, *self._fetches]
        while not self._queue.empty():
            queued = self._queue.get_nowait()
            if queued is not None:
                leftovers.append(queued)
        for future in leftovers:
            future.cancel()
        for result in await asyncio.gather(self._producer, *leftovers, return_exceptions=True):
            if isinstance(result, Fetched):
                result.release()
