"""The retrieval engine shared by C-MOVE and C-GET (PS3.4 C.4.2 and C.4.3).

A request becomes a list of instances (QIDO searches on the upstream, paging inside,
in a task of its own: `Listing`), and a pipeline that starts with the first answers:
up to ``retrieve.fetch_concurrency`` instances are fetched from the upstream at once,
at most twice that many wait fetched, and the C-STORE sub-operations go out strictly
in order on one association, while the search goes on. Instances of a SOP class the
search had not listed when that association was opened go last, over a second one.
A fetched instance above ``retrieve.spill_mb`` waits in a file under
``<spool>/retrieve``, so memory stays bounded by the window (and the look-ahead
before the first send) whatever the study size.

A STUDY or SERIES request whose study is named is read in bulk instead: one
RetrieveStudy/RetrieveSeries request per study or series (`BulkFeed`), started together
with the search, since the archive answers both at once and a search costs it about
as much per instance as the retrieval does. The search stays the list of what is
due: a bulk instance is sent once the search lists it, and an instance the bulk
answer lacks (or brings after failing) is fetched alone.

An instance is sent as it is stored when the receiver accepted that transfer syntax
(its bytes go out untouched, never parsed); otherwise it is transcoded, in a worker
thread, to the best syntax the receiver accepted (lossless first, lossy only if
``retrieve.allow_lossy``): frame by frame where it can be (`gateway.codecs.stream`),
so a few frames are in memory whatever the instance's size, into a file under
``<spool>/retrieve`` when the result is larger than ``retrieve.spill_mb``. Each
transcode first takes its estimated peak memory from a budget shared by every
retrieval (``retrieve.transcode_mb``, `ByteBudget`), so the codec threads together
stay within it. Counters feed the Pending responses, sent at least every
``pending_every`` sub-operations or ``pending_seconds``. A C-CANCEL takes effect
between sub-operations: the one on the wire completes and is counted.

The request and its statuses are in `gateway.dimse.retrieve_request` (errors become
statuses there, in one table: `failure_status`); the listing, the bulk answers and
the fetched instances in `gateway.dimse.retrieve_sources`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from gateway.codecs import TranscodeError, choose_transfer_syntax, transcode
from gateway.codecs.stream import FRAMES_HELD, Header, frame_size, obstacle, read_header, transcode_stream
from gateway.codecs.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from gateway.config import Config
from gateway.model.search import Search
from gateway.dimse.association import Association, Message
from gateway.dimse.command import Command, response
from gateway.dimse.find import decode_identifier, encode_identifier
from gateway.model.query import make_key
from gateway.dimse.requestor import DataSource, FileSlice, RequestorError
from gateway.dimse.retrieve_request import (
    CANCEL,
    OUT_OF_RESOURCES_SUBOPS,
    PATIENT_ID,
    PENDING,
    SERIES_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_ROOT_CLASSES,
    STUDY_UID,
    SUCCESS,
    UNABLE_TO_PROCESS,
    WARNING,
    InstanceRef,
    RetrieveError,
    RetrieveRequest,
    failure_status,
    parse_retrieve_identifier,
)
from gateway.dimse.retrieve_sources import (
    LOOKAHEAD_BYTES,
    LOOKAHEAD_INSTANCES,
    META_HEAD,
    BulkFeed,
    Fetched,
    Listing,
    part10_header,
)
from gateway.uids import is_valid_uid
from gateway.upstream.base import ANY_SYNTAX, JsonObject, Retrieved, Upstream
from gateway.upstream.errors import NotFound, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger("gateway.dimse")

# C-STORE statuses counted as warnings rather than failures (PS3.4 B.2.3)
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})

UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
# Why an instance without a SOP Class UID (in the search answer and the file) fails:
# a C-STORE-RQ must name it (AffectedSOPClassUID), and no context can be proposed.
NO_SOP_CLASS = "no SOP Class UID in the archive's answer or file; no C-STORE can carry it"
# Proposed (after the stored syntaxes and uncompressed) so a receiver that takes only
# compressed data can still be served by recompressing losslessly.
LOSSLESS_COMPRESSED = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5")


# -- the search's answers ------------------------------------------------------------------


def _first(obj: JsonObject, key: str) -> str:
    value = (obj.get(key) or {}).get("Value") or [""]
    return str(value[0]) if value[0] is not None else ""


def _ref(obj: JsonObject) -> InstanceRef | None:
    ref = InstanceRef(_first(obj, "0020000D"), _first(obj, "0020000E"), _first(obj, "00080018"), _first(obj, "00080016"))
    if not all(is_valid_uid(u) for u in (ref.study_uid, ref.series_uid, ref.sop_instance_uid)):
        return None  # an archive answer we could not put in a URL safely
    return ref


def _uid_key(tag: int, uids: tuple[str, ...]):  # type: ignore[no-untyped-def]
    return make_key(DataElement(tag, "UI", list(uids) if len(uids) > 1 else uids[0]))


# -- the receiving side -------------------------------------------------------------------


class StoreTarget(Protocol):
    """Where the sub-operations go: the move destination or the C-GET requester."""

    def syntaxes(self, sop_class_uid: str) -> dict[str, int]:
        """Accepted transfer syntax -> presentation context id, for one SOP class."""
        ...

    def offered(self, sop_class_uid: str) -> bool:
        """Whether the receiver was asked for the SOP class at all (accepted or not);
        an instance of a class it was not asked for waits for another association."""
        ...

    async def send(self, context_id: int, sop_class_uid: str, sop_instance_uid: str, dataset: DataSource) -> Command:
        """One C-STORE; raises RequestorError when the association is gone."""
        ...


@dataclass
class Counts:
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

    def command_fields(self, with_remaining: bool) -> dict[int, int | str | tuple[int, ...]]:
        values: dict[int, int | str | tuple[int, ...]] = {
            0x1021: self.completed,
            0x1022: self.failed,
            0x1023: self.warning,
        }
        if with_remaining:
            values[0x1020] = self.remaining
        return values

    def final_status(self, complete: bool = True) -> int:
        """The final status once the sub-operations are over (PS3.4 C.4.2.1.5, C.4.3.1.4).

        ``complete`` is False when the request could not be served whole although
        sub-operations ran (the search failed part-way): never Success then, but
        Warning when any sub-operation completed, else Refused 0xA702.
        """
        if complete and self.failed == 0 and self.warning == 0:
            return SUCCESS
        if self.completed == 0 and self.warning == 0:
            return OUT_OF_RESOURCES_SUBOPS
        return WARNING


def failed_identifier(counts: Counts) -> Dataset | None:
    """The final response identifier: Failed SOP Instance UID List, when any failed."""
    if not counts.failed_uids:
        return None
    ds = Dataset()
    ds.FailedSOPInstanceUIDList = counts.failed_uids if len(counts.failed_uids) > 1 else counts.failed_uids[0]
    return ds


# -- transcoding ------------------------------------------------------------------------------


class ByteBudget:
    """Memory the transcodes of every retrieval may hold at once, in bytes.

    A transcode takes its estimated peak first and waits, in order of asking, until it
    fits beside what the running ones hold; one larger than the whole budget waits to
    run alone. So the codec threads never hold several large instances decoded at once.
    Used from the event loop only.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(capacity, 1)
        self.held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int) -> int:
        """Wait until ``size`` bytes fit; returns the amount held, to `release` later."""
        size = min(max(size, 0), self.capacity)
        if not self._waiting and self.held + size <= self.capacity:
            self.held += size
            return size
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].cancelled():  # still waiting: give up the place
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._grant()
            else:  # granted just as the cancellation came
                self.release(size)
            raise
        return size

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.capacity:
            size, waiter = self._waiting.popleft()
            if not waiter.cancelled():
                self.held += size
                waiter.set_result(None)


@dataclass
class Conversion:
    """How one instance is converted for its receiver, decided from its header."""

    target: str
    header: Header | None  # None: converted whole (`gateway.codecs.stream` says when)
    holds: int  # estimated peak memory of the conversion, in bytes
    output: int  # estimated size of the converted data set, in bytes


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of a seekable file, as a file of their own: the
    Part 10 file inside a retrieved answer (which may hold more, e.g. multipart)."""

    name = "<retrieved instance>"  # pydicom asks file objects for one

    def __init__(self, raw: BinaryIO, start: int, length: int) -> None:
        super().__init__()
        self._raw, self._start, self._length, self._pos = raw, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        size = max(min(len(buffer), self._length - self._pos), 0)
        if size == 0:
            return 0
        self._raw.seek(self._start + self._pos)
        count = self._raw.readinto(memoryview(buffer)[:size])  # type: ignore[attr-defined]
        self._pos += count
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def part10_file(retrieved: Retrieved) -> Iterator[BinaryIO]:
    """The retrieved Part 10 file, readable and seekable (blocking for files)."""
    raw: BinaryIO = BytesIO(retrieved.data) if retrieved.data is not None else open(retrieved.path, "rb")  # type: ignore[arg-type]
    with io.BufferedReader(_Window(raw, retrieved.offset, retrieved.length), 1 << 16) as fp:  # type: ignore[arg-type]
        yield fp  # type: ignore[misc]


def _drop_output(future: asyncio.Future[tuple[DataSource, Path | None]]) -> None:
    """Delete the spill file of a conversion nobody waits for any more."""
    if not future.cancelled() and future.exception() is None and future.result()[1] is not None:
        future.result()[1].unlink(missing_ok=True)  # type: ignore[union-attr]


# -- the engine -------------------------------------------------------------------------------


class Retriever:
    """Dependencies of C-MOVE and C-GET, bound once (no globals)."""

    def __init__(self, config: Config, upstream: Upstream) -> None:
        self.config = config
        self.upstream = upstream
        self.spill_dir = config.spool.directory / "retrieve"
        # Spill files of a previous run are orphans: nothing can still be sending them.
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.spill_bytes = int(config.retrieve.spill_mb * 1024 * 1024)
        self.codecs = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="retrieve-codec")
        self.budget = ByteBudget(int(config.retrieve.transcode_mb * 1024 * 1024))

    def close(self) -> None:
        self.codecs.shutdown(wait=False, cancel_futures=True)

    # ---- searching ------------------------------------------------------------------------

    async def search(self, request: RetrieveRequest) -> AsyncIterator[InstanceRef]:
        """Every instance the request names, by QIDO on the upstream, deduplicated,
        each as soon as its page arrives."""
        include = (SOP_CLASS_UID, STUDY_UID, SERIES_UID, SOP_INSTANCE_UID)
        searches: list[Search] = []
        base = {"include": include}
        if request.level == "PATIENT":
            assert request.patient_id is not None
            search = Search(keys=(make_key(DataElement(PATIENT_ID, "LO", request.patient_id)),), include=(STUDY_UID, PATIENT_ID))
            studies: list[str] = []
            async for obj in self.upstream.search_for_studies(search):
                if _first(obj, "00100020") == request.patient_id and is_valid_uid(_first(obj, "0020000D")):
                    studies.append(_first(obj, "0020000D"))
            searches = [Search(study_uid=s, **base) for s in dict.fromkeys(studies)]  # type: ignore[arg-type]
        elif request.level == "STUDY":
            searches = [Search(study_uid=s, **base) for s in request.study_uids]  # type: ignore[arg-type]
        elif request.level == "SERIES":
            study = request.study_uids[0] if request.study_uids else None
            if study:
                searches = [Search(study_uid=study, series_uid=s, **base) for s in request.series_uids]  # type: ignore[arg-type]
            else:
                searches = [Search(keys=(_uid_key(SERIES_UID, request.series_uids),), **base)]  # type: ignore[arg-type]
        else:
            study = request.study_uids[0] if request.study_uids else None
            series = request.series_uids[0] if request.series_uids else None
            searches = [
                Search(
                    keys=(_uid_key(SOP_INSTANCE_UID, request.sop_uids),),
                    study_uid=study,
                    series_uid=series if study else None,
                    **base,  # type: ignore[arg-type]
                )
            ]
        wanted_series = set(request.series_uids)
        wanted_sops = set(request.sop_uids)
        found: set[str] = set()
        for search in searches:
            try:
                async for obj in self.upstream.search_for_instances(search):
                    ref = _ref(obj)
                    if ref is None or ref.sop_instance_uid in found:
                        continue
                    # The archive may match loosely; the request is exact.
                    if wanted_series and ref.series_uid not in wanted_series:
                        continue
                    if wanted_sops and ref.sop_instance_uid not in wanted_sops:
                        continue
                    found.add(ref.sop_instance_uid)
                    yield ref
            except NotFound:
                continue

    # ---- fetching -------------------------------------------------------------------------

    async def inspect(self, retrieved: Retrieved) -> tuple[str, str, str, int]:
        """`part10_header` of a retrieved instance (a spilled one read in a thread)."""
        if retrieved.data is not None:
            head = retrieved.read(0, META_HEAD)
        else:
            head = await asyncio.get_running_loop().run_in_executor(None, retrieved.read, 0, META_HEAD)
        return part10_header(head)

    async def fetch(self, ref: InstanceRef) -> Fetched:
        """Fetch one instance and read its File Meta; never raises (the error is kept)."""
        item = Fetched(ref)
        try:
            item.retrieved = await self.upstream.retrieve_instance(
                ref.study_uid, ref.series_uid, ref.sop_instance_uid, self.spill_dir, self.spill_bytes,
                acceptable=ANY_SYNTAX,
            )
            ts, sop_class, sop_instance, offset = await self.inspect(item.retrieved)
            item.transfer_syntax, item.dataset_offset = ts, offset
            item.sop_class_uid = sop_class or ref.sop_class_uid
            if sop_instance and sop_instance != ref.sop_instance_uid:
                raise ValueError("archive returned a different instance")
        except NotFound:
            item.error = "not found in the archive"
        except (UpstreamUnavailable, UpstreamRejected) as exc:
            item.error = str(exc)
        except (ValueError, OSError) as exc:
            item.error = f"unusable instance: {exc}"
        if item.error:
            item.release()
        return item

    # ---- transcoding ----------------------------------------------------------------------

    def _plan(self, item: Fetched, accepted: list[str]) -> Conversion:
        """Read the instance's header and decide how to convert it (worker thread)."""
        r = item.retrieved
        assert r is not None
        with part10_file(r) as fp:
            header = read_header(fp)
        desc = header.description()
        allow_lossy = self.config.retrieve.allow_lossy
        target = choose_transfer_syntax(header.source, accepted, allow_lossy, has_pixel_data=header.has_pixel_data, desc=desc)
        if target is None:
            raise TranscodeError(f"no accepted transfer syntax can carry this {item.transfer_syntax} instance")
        decoded = header.decoded_size()
        if desc is not None and obstacle(header, target) is None:
            return Conversion(str(target), header, FRAMES_HELD * frame_size(desc), r.length + decoded)
        # Whole: the stored bytes and their parse, the decoded frames, the new pixel
        # data, the written data set and its copy.
        return Conversion(str(target), None, 2 * r.length + 4 * decoded, r.length + decoded)

    def _whole(self, item: Fetched, target: str) -> memoryview:
        """The data set converted by the whole-instance `transcode` (worker thread)."""
        assert item.retrieved is not None
        ds = dcmread(BytesIO(item.retrieved.read()), force=True)
        out = transcode(ds, target, allow_lossy=self.config.retrieve.allow_lossy)
        del ds
        buffer = BytesIO()
        dcmwrite(buffer, out, enforce_file_format=True)
        encoded = buffer.getbuffer()
        return encoded[part10_header(bytes(encoded[:META_HEAD]))[3] :]

    def _convert(self, item: Fetched, conversion: Conversion) -> tuple[DataSource, Path | None]:
        """The converted data set, in memory or in a spill file (returned to delete after
        sending) when larger than ``retrieve.spill_mb`` (worker thread)."""
        assert item.retrieved is not None
        path = self.spill_dir / f"{uuid.uuid4().hex}.converted" if conversion.output > self.spill_bytes else None
        try:
            with open(path, "w+b") if path is not None else BytesIO() as out:
                if conversion.header is not None:
                    with part10_file(item.retrieved) as fp:
                        transcode_stream(fp, conversion.header, conversion.target, out)
                else:
                    out.write(self._whole(item, conversion.target))
                if path is None:
                    return out.getvalue(), None  # type: ignore[union-attr]
                size = out.seek(0, io.SEEK_END)
            return FileSlice(path, 0, size), path
        except BaseException:
            if path is not None:
                path.unlink(missing_ok=True)
            raise

    async def transcoded(self, item: Fetched, accepted: list[str]) -> tuple[str, DataSource, Path | None]:
        """(syntax, data set, spill file to delete after sending or None) of the instance
        converted for the receiver, within the memory budget.

        The worker thread cannot be interrupted: when the request is cancelled meanwhile,
        its budget stays taken until it ends and its output is then deleted.
        """
        loop = asyncio.get_running_loop()
        conversion = await loop.run_in_executor(self.codecs, self._plan, item, accepted)
        held = await self.budget.acquire(conversion.holds)
        future = loop.run_in_executor(self.codecs, self._convert, item, conversion)
        future.add_done_callback(lambda _: self.budget.release(held))
        try:
            dataset, spilled = await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_drop_output)
            raise
        return conversion.target, dataset, spilled

    # ---- the pipeline ---------------------------------------------------------------------

    def bulk(self, request: RetrieveRequest, what: str) -> BulkFeed | None:
        """Start reading the request's series or studies whole, or None when it names
        neither with its study (the series of a study not named, single instances)."""
        if request.level == "STUDY":
            scopes: list[tuple[str, str | None]] = [(study, None) for study in request.study_uids]
        elif request.level == "SERIES" and request.study_uids:
            scopes = [(request.study_uids[0], series) for series in request.series_uids]
        else:
            return None
        return BulkFeed(self, scopes, LOOKAHEAD_INSTANCES, what)

    async def run(
        self,
        listing: Listing,
        open_target: Callable[[list[Fetched], list[InstanceRef]], Awaitable[StoreTarget]],
        report: Callable[[Counts], Awaitable[None]],
        cancelled: asyncio.Event,
        what: str,
        feed: BulkFeed | None = None,
    ) -> Counts:
        """Fetch and send every instance ``listing`` lists; returns the counts
        (``cancelled`` stops it between sub-operations, leaving the rest in ``remaining``).

        Sending starts while the search is still listing: instances come from ``feed``
        first, each once the search has listed it, then the listed ones it did not
        bring are fetched one by one. ``open_target`` is called with the first
        LOOKAHEAD_INSTANCES fetched instances (fewer if they hold LOOKAHEAD_BYTES) and
        what the search has listed by then, so a C-MOVE can propose contexts for the
        SOP classes and syntaxes seen. An instance of a SOP class that target was not
        asked for (listed later) is set aside and fetched again at the end, for a
        second ``open_target`` call with the set-aside ones (the first target is done
        with by then), which a C-MOVE turns into a second association. Pending
        responses wait for the search to finish, since only then is the number
        remaining known.
        Raises the search's error if it failed before anything was sent, and
        RequestorError if the first target cannot be opened at all.
        """
        cfg = self.config.retrieve
        counts = Counts()
        window = 2 * cfg.fetch_concurrency
        gate = asyncio.Semaphore(cfg.fetch_concurrency)
        queue: asyncio.Queue[asyncio.Future[Fetched] | None] = asyncio.Queue(maxsize=window)
        fetches: set[asyncio.Task[Fetched]] = set()
        loop = asyncio.get_running_loop()

        async def gated(ref: InstanceRef) -> Fetched:
            async with gate:
                return await self.fetch(ref)

        async def produce() -> None:
            delivered: set[str] = set()
            if feed is not None:
                async for item in feed:
                    uid = item.ref.sop_instance_uid
                    ref = None if uid in delivered else await listing.listed(uid)
                    if ref is None:
                        item.release()  # stored after the search, or sent twice
                        continue
                    delivered.add(uid)
                    item.ref = ref
                    item.sop_class_uid = item.sop_class_uid or ref.sop_class_uid
                    counts.bulk += 1
                    arrived: asyncio.Future[Fetched] = loop.create_future()
                    arrived.set_result(item)
                    try:
                        await queue.put(arrived)
                    except asyncio.CancelledError:
                        item.release()
                        raise
            await listing.complete()
            for ref in list(listing.refs.values()):
                if ref.sop_instance_uid in delivered:
                    continue
                task = asyncio.create_task(gated(ref))
                fetches.add(task)
                task.add_done_callback(fetches.discard)
                await queue.put(task)
            await queue.put(None)

        producer = asyncio.create_task(produce())
        ahead: deque[asyncio.Future[Fetched]] = deque()
        deferred: list[Fetched] = []  # File Meta of the set-aside instances, no data
        first_error = ""
        broken = ""
        last_report, since = time.monotonic(), 0

        async def deliver(target: StoreTarget, item: Fetched) -> None:
            """Send one instance (or count it failed), then report when one is due."""
            nonlocal first_error, broken, last_report, since
            try:
                if broken:
                    counts.fail(item.ref.sop_instance_uid)
                    return
                try:
                    outcome = await self._send_one(target, item, counts)
                except RequestorError as exc:
                    broken = str(exc)
                    log.warning("%s: receiver association lost after %d sub-operations: %s", what, counts.completed + counts.failed + counts.warning, exc)
                    counts.fail(item.ref.sop_instance_uid)
                    return
                if outcome and not first_error:
                    first_error = outcome
                    log.warning("%s: sub-operation failed: %s", what, outcome)
            finally:
                item.release()
            since += 1
            now = time.monotonic()
            if listing.done:
                counts.total = len(listing.refs)
                if counts.remaining and (since >= cfg.pending_every or now - last_report >= cfg.pending_seconds):
                    await report(counts)
                    last_report, since = now, 0

        try:
            first: list[Fetched] = []
            held = 0
            while len(ahead) < LOOKAHEAD_INSTANCES and held < LOOKAHEAD_BYTES:
                task = await queue.get()
                if task is None:
                    queue.put_nowait(None)
                    break
                ahead.append(task)
                first.append(await task)
                r = first[-1].retrieved
                held += r.length if r is not None and r.data is not None else 0
            if cancelled.is_set():
                return counts
            if not first and listing.error is not None:
                raise listing.error
            if not first:
                return counts  # nothing to send: no association to open
            target = await open_target(first, list(listing.refs.values()))
            while True:
                task = ahead.popleft() if ahead else await queue.get()
                if task is None:
                    break
                item = await task
                if not item.error and not item.sop_class_uid:
                    item.error = NO_SOP_CLASS
                if not item.error and not broken and not target.offered(item.sop_class_uid):
                    deferred.append(Fetched(item.ref, transfer_syntax=item.transfer_syntax, sop_class_uid=item.sop_class_uid))
                    item.release()
                    continue
                await deliver(target, item)
                if cancelled.is_set():
                    return counts
            if deferred and broken:
                for info in deferred:
                    counts.fail(info.ref.sop_instance_uid)
            elif deferred:
                await self._send_deferred(deferred, open_target, deliver, counts, cancelled, what)
            return counts
        finally:
            counts.total = len(listing.refs)
            producer.cancel()
            for task in list(fetches):
                task.cancel()
            leftovers = [*ahead, *fetches]
            while not queue.empty():
                t = queue.get_nowait()
                if t is not None:
                    leftovers.append(t)
            for t in leftovers:
                t.cancel()
            for result in await asyncio.gather(producer, *leftovers, return_exceptions=True):
                if isinstance(result, Fetched):
                    result.release()

    async def _send_deferred(
        self,
        deferred: list[Fetched],
        open_target: Callable[[list[Fetched], list[InstanceRef]], Awaitable[StoreTarget]],
        deliver: Callable[[StoreTarget, Fetched], Awaitable[None]],
        counts: Counts,
        cancelled: asyncio.Event,
        what: str,
    ) -> None:
        """The instances the first target was not asked for, over a second one.

        They are fetched again (their data was released when they were set aside, so
        memory stays bounded however many there are), one ahead of the one sending.
        """
        try:
            target = await open_target(deferred, [])
        except RequestorError as exc:
            log.warning("%s: cannot open the association for %d more instances: %s", what, len(deferred), exc)
            for info in deferred:
                counts.fail(info.ref.sop_instance_uid)
            return
        nxt: asyncio.Task[Fetched] | None = asyncio.create_task(self.fetch(deferred[0].ref))
        try:
            for index in range(len(deferred)):
                assert nxt is not None
                item = await nxt
                nxt = asyncio.create_task(self.fetch(deferred[index + 1].ref)) if index + 1 < len(deferred) else None
                await deliver(target, item)
                if cancelled.is_set():
                    return
        finally:
            if nxt is not None:
                nxt.cancel()
                result = (await asyncio.gather(nxt, return_exceptions=True))[0]
                if isinstance(result, Fetched):
                    result.release()

    async def _send_one(self, target: StoreTarget, item: Fetched, counts: Counts) -> str:
        """Send one instance, updating ``counts``; returns a failure reason or ''."""
        uid = item.ref.sop_instance_uid
        if item.error:
            counts.fail(uid)
            return item.error
        accepted = target.syntaxes(item.sop_class_uid)
        if not accepted:
            counts.fail(uid)
            return "receiver accepted no presentation context for the SOP class"
        context_id = accepted.get(item.transfer_syntax)
        dataset: DataSource
        spilled: Path | None = None
        if context_id is not None:
            dataset = item.dataset()
        else:
            try:
                syntax, dataset, spilled = await self.transcoded(item, list(accepted))
            except TranscodeError as exc:
                counts.fail(uid)
                return f"cannot transcode: {exc}"
            except Exception as exc:  # noqa: BLE001 - a codec crash fails this sub-operation only
                counts.fail(uid)
                return f"cannot transcode: {type(exc).__name__}: {exc}"
            counts.transcoded += 1
            context_id = accepted[syntax]
        try:
            rsp = await target.send(context_id, item.sop_class_uid, uid, dataset)
        finally:
            if spilled is not None:
                spilled.unlink(missing_ok=True)
        status = int(rsp.get(0x0900, 0xFFFF))  # type: ignore[arg-type]
        if status == SUCCESS:
            counts.completed += 1
            return ""
        if status in STORE_WARNINGS:
            counts.warning += 1
            return ""
        counts.fail(uid)
        return f"receiver answered C-STORE status 0x{status:04X}"


def proposals(refs: list[InstanceRef], first: list[Fetched]) -> list[tuple[str, list[str]]]:
    """Presentation contexts for a move destination, at most 128.

    One context per SOP class offering Explicit and Implicit VR Little Endian (every
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
    out: list[tuple[str, list[str]]] = [(c, list(UNCOMPRESSED)) for c in classes]
    out += [(c, [ts]) for c in classes for ts in stored.get(c, [])]
    out += [(c, list(LOSSLESS_COMPRESSED)) for c in classes]
    return out[:128]


# -- the service, C-MOVE and C-GET alike ----------------------------------------------------


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

    async def open_target(self, assoc: Association, message: Message, refs: list[InstanceRef], first: list[Fetched]) -> tuple[StoreTarget, Callable[[], Awaitable[None]]]:
        """The receiver of the sub-operations and how to close it afterwards."""
        raise NotImplementedError

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
        feed = self.retriever.bulk(request, what)
        listing = Listing(self.retriever, request)
        try:
            await self._retrieve(assoc, message, listing, feed, send, what, started)
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
        assoc: Association,
        message: Message,
        listing: Listing,
        feed: BulkFeed | None,
        send: Callable[..., Awaitable[None]],
        what: str,
        started: float,
    ) -> None:
        """Run the sub-operations as the search lists them, send the final response."""
        cancelled = asyncio.Event()
        closers: list[Callable[[], Awaitable[None]]] = []
        opening = False  # from then on a C-CANCEL waits for the sub-operation in progress

        async def open_target(first: list[Fetched], refs: list[InstanceRef]) -> StoreTarget:
            nonlocal opening
            opening = True
            # The previous receiver is done with: release it first, since a destination
            # may take one association at a time (storescp without --fork does).
            for close in closers:
                with contextlib.suppress(Exception):
                    await close()
            target, close = await self.open_target(assoc, message, refs, first)
            closers.append(close)
            return target

        async def report(counts: Counts) -> None:
            await send(PENDING, extra=counts.command_fields(True))

        worker = asyncio.create_task(self.retriever.run(listing, open_target, report, cancelled, what, feed))
        interrupted = False
        try:
            try:
                counts = await asyncio.shield(worker)
            except asyncio.CancelledError:
                # C-CANCEL (or the requester went away): stop between sub-operations,
                # or at once while nothing is being sent yet.
                interrupted = True
                cancelled.set()
                if opening:
                    counts = await worker
                else:
                    worker.cancel()
                    await asyncio.wait([worker])
                    counts = Counts() if worker.cancelled() else worker.result()
        except RequestorError as exc:
            await listing.complete()
            counts = Counts(total=len(listing.refs))
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
            for close in closers:
                with contextlib.suppress(Exception):
                    await close()
        elapsed = time.monotonic() - started
        extra = counts.command_fields(False)
        if interrupted or cancelled.is_set():
            status = CANCEL
            extra = counts.command_fields(True)
        elif listing.error is not None:
            # Cut short after sub-operations began: 0xA701 would say none ran. Every
            # instance it listed has been sent or counted failed (with its UID) by now,
            # since the engine goes through all of them; what it never listed is unknown
            # to us, so the request ends in Warning (or 0xA702 when nothing completed)
            # with the counts, and the comment says the search failed.
            status = counts.final_status(complete=False)
            comment = failure_status(listing.error).comment
            extra[0x0902] = f"search failed after {len(listing.refs)} listed: {comment}"[:64]
            log.warning("%s: search failed after listing %d instances: %s", what, len(listing.refs), comment)
        else:
            status = counts.final_status()
        log.info(
            "%s: %d instances (%d in bulk), %d completed, %d failed, %d warning, %d transcoded, %d not sent, over %d association(s), 0x%04X, %.2f s",
            what, counts.total, counts.bulk, counts.completed, counts.failed, counts.warning, counts.transcoded,
            counts.remaining, len(closers), status, elapsed,
        )
        with contextlib.suppress(Exception):
            await send(status, failed_identifier(counts), extra)
        if interrupted:
            raise asyncio.CancelledError()
