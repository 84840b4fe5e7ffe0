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
``retrieve.allow_lossy``). Counters feed the Pending responses, sent at least every
``pending_every`` sub-operations or ``pending_seconds``. A C-CANCEL takes effect
between sub-operations: the one on the wire completes and is counted.

Errors become statuses here, in one table (`failure_status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from io import BytesIO
from typing import Protocol

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue

from gateway.codecs import TranscodeError, choose_for_dataset, transcode
from gateway.config import Config
from gateway.dicomweb.qido import Search
from gateway.dimse.association import Association, Message
from gateway.dimse.command import Command, response
from gateway.dimse.find import decode_identifier, encode_identifier
from gateway.dimse.query import make_key
from gateway.dimse.requestor import DataSource, FileSlice, RequestorError
from gateway.uids import is_valid_uid
from gateway.upstream.base import JsonObject, Retrieved, Upstream
from gateway.upstream.errors import NotFound, UpstreamAuthError, UpstreamError, UpstreamRejected, UpstreamUnavailable

log = logging.getLogger("gateway.dimse")

# Statuses (PS3.4 C.4.2.1.5, C.4.3.1.4)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000
REFUSED_NOT_AUTHORIZED = 0x0124
OUT_OF_RESOURCES_MATCHES = 0xA701
OUT_OF_RESOURCES_SUBOPS = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_DOES_NOT_MATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
# C-STORE statuses counted as warnings rather than failures (PS3.4 B.2.3)
STORE_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
# Proposed (after the stored syntaxes and uncompressed) so a receiver that takes only
# compressed data can still be served by recompressing losslessly.
LOSSLESS_COMPRESSED = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5")

QUERY_RETRIEVE_LEVEL = 0x00080052
PATIENT_ID = 0x00100020
STUDY_UID = 0x0020000D
SERIES_UID = 0x0020000E
SOP_INSTANCE_UID = 0x00080018
SOP_CLASS_UID = 0x00080016
FAILED_SOP_INSTANCE_UID_LIST = 0x00080058
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
STUDY_ROOT_CLASSES = frozenset({STUDY_ROOT_MOVE, STUDY_ROOT_GET})
# Instances fetched before the destination association is opened, so its contexts
# cover the syntaxes they are stored in (the archive's search answers do not say).
LOOKAHEAD_INSTANCES = 64
LOOKAHEAD_BYTES = 64 << 20  # of in-memory instances; spilled ones cost no memory
META_HEAD = 64 * 1024  # the File Meta group is never near this long
LONG_VRS = frozenset({b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR"})


class RetrieveError(Exception):
    """The request cannot be served; ``status`` is the final status to send."""

    def __init__(self, message: str, status: int, offending: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.offending = tuple(offending)


def failure_status(exc: BaseException) -> tuple[int, str]:
    """The one table from errors before any sub-operation to C-MOVE/C-GET statuses."""
    if isinstance(exc, RetrieveError):
        return exc.status, str(exc)
    if isinstance(exc, UpstreamAuthError):
        return UNABLE_TO_PROCESS, "archive refused the gateway's credentials"
    if isinstance(exc, UpstreamRejected):
        return UNABLE_TO_PROCESS, str(exc)
    if isinstance(exc, (UpstreamUnavailable, TimeoutError)):
        return OUT_OF_RESOURCES_MATCHES, f"archive unavailable: {exc}" if str(exc) else "archive unavailable"
    return UNABLE_TO_PROCESS, f"internal error ({type(exc).__name__})"


# -- the request ------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrieveRequest:
    """What a C-MOVE/C-GET identifier names: a level and the unique keys down to it."""

    level: str
    patient_id: str | None = None
    study_uids: tuple[str, ...] = ()
    series_uids: tuple[str, ...] = ()
    sop_uids: tuple[str, ...] = ()


def _values(ds: Dataset, tag: int) -> tuple[str, ...]:
    elem = ds.get(tag)
    if elem is None or elem.value in (None, ""):
        return ()
    raw = list(elem.value) if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    return tuple(str(v).strip().rstrip("\x00") for v in raw if str(v).strip())


def parse_retrieve_identifier(ds: Dataset, study_root: bool) -> RetrieveRequest:
    """Validate a retrieve identifier (PS3.4 C.4.2.2.1: unique keys only, hierarchical).

    A list of UIDs is allowed at the retrieve level; the levels above need their one
    unique key, except that the study (and series) UID may be left out at SERIES and
    IMAGE level, since UIDs are unique anyway and SCUs do leave them out.
    """
    level_elem = ds.get(QUERY_RETRIEVE_LEVEL)
    level = str(level_elem.value).strip().upper() if level_elem is not None and level_elem.value else ""
    if level not in LEVELS or (study_root and level == "PATIENT"):
        raise RetrieveError(f"QueryRetrieveLevel {level!r} not valid here", IDENTIFIER_DOES_NOT_MATCH, [QUERY_RETRIEVE_LEVEL])
    studies, series, sops = _values(ds, STUDY_UID), _values(ds, SERIES_UID), _values(ds, SOP_INSTANCE_UID)
    for tag, uids in ((STUDY_UID, studies), (SERIES_UID, series), (SOP_INSTANCE_UID, sops)):
        if any(not is_valid_uid(u) for u in uids):
            raise RetrieveError("invalid UID in the identifier", IDENTIFIER_DOES_NOT_MATCH, [tag])
    patient = _values(ds, PATIENT_ID)
    if level == "PATIENT":
        if len(patient) != 1 or "*" in patient[0] or "?" in patient[0]:
            raise RetrieveError("PATIENT level needs one PatientID", IDENTIFIER_DOES_NOT_MATCH, [PATIENT_ID])
        return RetrieveRequest(level, patient_id=patient[0])
    if level == "STUDY":
        if not studies:
            raise RetrieveError("STUDY level needs StudyInstanceUID", IDENTIFIER_DOES_NOT_MATCH, [STUDY_UID])
        return RetrieveRequest(level, study_uids=studies)
    if len(studies) > 1:
        raise RetrieveError("one StudyInstanceUID above the retrieve level", IDENTIFIER_DOES_NOT_MATCH, [STUDY_UID])
    if level == "SERIES":
        if not series:
            raise RetrieveError("SERIES level needs SeriesInstanceUID", IDENTIFIER_DOES_NOT_MATCH, [SERIES_UID])
        return RetrieveRequest(level, study_uids=studies, series_uids=series)
    if len(series) > 1:
        raise RetrieveError("one SeriesInstanceUID above the retrieve level", IDENTIFIER_DOES_NOT_MATCH, [SERIES_UID])
    if not sops:
        raise RetrieveError("IMAGE level needs SOPInstanceUID", IDENTIFIER_DOES_NOT_MATCH, [SOP_INSTANCE_UID])
    return RetrieveRequest(level, study_uids=studies, series_uids=series, sop_uids=sops)


# -- instances ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceRef:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


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


@dataclass
class Fetched:
    """One instance after its fetch: where its Part 10 file is and what its meta says."""

    ref: InstanceRef
    retrieved: Retrieved | None = None
    transfer_syntax: str = ""
    sop_class_uid: str = ""
    dataset_offset: int = 0  # where the data set starts, within the Part 10 file
    error: str = ""

    def dataset(self) -> DataSource:
        """The data set bytes as stored, without preamble and File Meta."""
        r = self.retrieved
        assert r is not None
        if r.data is not None:
            return memoryview(r.data)[r.offset + self.dataset_offset : r.offset + r.length]
        assert r.path is not None
        return FileSlice(r.path, r.offset + self.dataset_offset, r.length - self.dataset_offset)

    def release(self) -> None:
        if self.retrieved is not None:
            self.retrieved.release()
            self.retrieved = None


def part10_header(head: bytes) -> tuple[str, str, str, int]:
    """(transfer syntax, SOP class, SOP instance, data set offset) of a Part 10 file.

    Read directly: the File Meta group is a few explicit VR little endian elements,
    and parsing the whole file with pydicom would cost more than sending it.
    """
    if head[128:132] == b"DICM":
        pos = 132
    elif head[:2] == b"\x02\x00":
        pos = 0  # an archive that sends the meta group without the preamble
    else:
        raise ValueError("not a DICOM Part 10 file")
    values: dict[int, str] = {}
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = head[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", head, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", head, pos + 6)
            start = pos + 8
        if start + length > len(head):
            raise ValueError("File Meta element runs past the end")
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = head[start : start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if 0x0010 not in values:
        raise ValueError("File Meta without a Transfer Syntax UID")
    return values[0x0010], values.get(0x0002, ""), values.get(0x0003, ""), pos


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

    def final_status(self) -> int:
        if self.failed == 0 and self.warning == 0:
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

    def close(self) -> None:
        self.codecs.shutdown(wait=False, cancel_futures=True)

    # ---- searching ------------------------------------------------------------------------

    async def search(self, request: RetrieveRequest) -> AsyncIterator[InstanceRef]:
        """Every instance the request names, by QIDO on the upstream, deduplicated,
        each as soon as its page arrives."""
        f = self.config.find
        include = (SOP_CLASS_UID, STUDY_UID, SERIES_UID, SOP_INSTANCE_UID)
        searches: list[Search] = []
        base = {"include": include, "page_size": f.page_size, "timeout": f.timeout}
        if request.level == "PATIENT":
            assert request.patient_id is not None
            search = Search(keys=(make_key(DataElement(PATIENT_ID, "LO", request.patient_id)),), include=(STUDY_UID, PATIENT_ID), page_size=f.page_size, timeout=f.timeout)
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
                ref.study_uid, ref.series_uid, ref.sop_instance_uid, self.spill_dir, self.spill_bytes
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

    def _transcode(self, item: Fetched, accepted: list[str]) -> tuple[str, bytes]:
        """(syntax, data set bytes) of the instance re-encoded for the receiver (worker thread)."""
        assert item.retrieved is not None
        ds = dcmread(BytesIO(item.retrieved.read()), force=True)
        allow_lossy = self.config.retrieve.allow_lossy
        target = choose_for_dataset(ds, accepted, allow_lossy=allow_lossy)
        if target is None:
            raise TranscodeError(f"no accepted transfer syntax can carry this {item.transfer_syntax} instance")
        out = transcode(ds, target, allow_lossy=allow_lossy)
        buffer = DicomBytesIO()
        dcmwrite(buffer, out, enforce_file_format=True)
        encoded = buffer.getvalue()
        return str(target), encoded[part10_header(encoded[:META_HEAD])[3] :]

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
        if context_id is not None:
            dataset = item.dataset()
        else:
            loop = asyncio.get_running_loop()
            try:
                syntax, encoded = await loop.run_in_executor(self.codecs, self._transcode, item, list(accepted))
            except TranscodeError as exc:
                counts.fail(uid)
                return f"cannot transcode: {exc}"
            except Exception as exc:  # noqa: BLE001 - a codec crash fails this sub-operation only
                counts.fail(uid)
                return f"cannot transcode: {type(exc).__name__}: {exc}"
            counts.transcoded += 1
            context_id, dataset = accepted[syntax], encoded
        rsp = await target.send(context_id, item.sop_class_uid, uid, dataset)
        status = int(rsp.get(0x0900, 0xFFFF))  # type: ignore[arg-type]
        if status == SUCCESS:
            counts.completed += 1
            return ""
        if status in STORE_WARNINGS:
            counts.warning += 1
            return ""
        counts.fail(uid)
        return f"receiver answered C-STORE status 0x{status:04X}"


class Listing:
    """The search's answer as it arrives, gathered by a task of its own so that the
    sub-operations can start with its first page instead of waiting for the last (an
    archive such as Orthanc takes about as long to list a series as we take to send it).

    ``refs`` grows in search order; ``error`` is what ended the search early, if
    anything (what was listed until then stays listed).
    """

    def __init__(self, retriever: Retriever, request: RetrieveRequest) -> None:
        self.refs: dict[str, InstanceRef] = {}
        self.done = False
        self.error: Exception | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._search(retriever, request))

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _search(self, retriever: Retriever, request: RetrieveRequest) -> None:
        try:
            async for ref in retriever.search(request):
                self.refs[ref.sop_instance_uid] = ref
                self._notify()
        except Exception as exc:  # noqa: BLE001 - kept for the caller, which makes it a status
            self.error = exc
        finally:
            self.done = True
            self._notify()

    async def listed(self, sop_instance_uid: str) -> InstanceRef | None:
        """The instance's reference once the search lists it; None if it never does."""
        while sop_instance_uid not in self.refs and not self.done:
            await self._changed.wait()
        return self.refs.get(sop_instance_uid)

    async def complete(self) -> None:
        """Wait for the search to end, however it ends."""
        while not self.done:
            await self._changed.wait()

    async def close(self) -> None:
        """Stop searching (a cancelled request)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class BulkFeed:
    """Instances of whole studies or series, read by one WADO-RS request each, in a
    task of their own so that they arrive while the search is still answering.

    What has arrived waits here, up to ``limit`` instances and LOOKAHEAD_BYTES in
    memory (the look-ahead is then complete by the time the search answers); then
    reading pauses, which pauses the archive through TCP. A failed or
    unreadable answer ends the feed (what it lacks is then fetched alone), logged
    once, never raised.
    """

    def __init__(self, retriever: Retriever, scopes: list[tuple[str, str | None]], limit: int, what: str) -> None:
        self.retriever = retriever
        self.what = what
        self._queue: asyncio.Queue[Fetched | None] = asyncio.Queue(maxsize=max(limit, 1))
        self._held = 0  # bytes of the waiting in-memory instances
        self._room = asyncio.Event()
        self._task = asyncio.create_task(self._read(scopes))

    @staticmethod
    def _in_memory(item: Fetched) -> int:
        r = item.retrieved
        return r.length if r is not None and r.data is not None else 0

    async def _read(self, scopes: list[tuple[str, str | None]]) -> None:
        r = self.retriever
        try:
            for study_uid, series_uid in scopes:
                answer = r.upstream.iter_instances(study_uid, series_uid, r.spill_dir, r.spill_bytes)
                async with contextlib.aclosing(answer):
                    async for retrieved in answer:
                        item = Fetched(InstanceRef(study_uid, series_uid or "", "", ""), retrieved)
                        try:
                            item.transfer_syntax, item.sop_class_uid, sop_instance, item.dataset_offset = await r.inspect(retrieved)
                            item.ref = replace(item.ref, sop_instance_uid=sop_instance, sop_class_uid=item.sop_class_uid)
                            await self._queue.put(item)
                        except (ValueError, OSError):
                            item.release()  # unidentifiable: fetched alone if the search lists it
                            continue
                        except BaseException:
                            item.release()
                            raise
                        self._held += self._in_memory(item)
                        while self._held > LOOKAHEAD_BYTES:
                            self._room.clear()
                            await self._room.wait()
        except NotFound:
            pass  # nothing there; the search says the same
        except UpstreamError as exc:
            log.warning("%s: bulk retrieval stopped (%s); fetching the rest one by one", self.what, exc)
        except Exception:  # noqa: BLE001 - whatever went wrong, the rest is fetched alone
            log.exception("%s: bulk retrieval failed; fetching the rest one by one", self.what)
        await self._queue.put(None)

    async def __aiter__(self) -> AsyncIterator[Fetched]:
        while (item := await self._queue.get()) is not None:
            self._held -= self._in_memory(item)
            self._room.set()
            yield item

    async def close(self) -> None:
        """Stop reading and release every instance still waiting."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                item.release()


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
    """What C-MOVE and C-GET share: permission, identifier, search, run, statuses.

    Subclasses say where the sub-operations go (`open_target`) and what may refuse
    the request before anything is searched (`precheck`).
    """

    name = ""
    rsp_field = 0
    permission = ""

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

        peer = self.config.peer(assoc.calling_ae)
        if peer is not None and self.permission not in peer.permissions:
            log.warning("%s refused: peer has no %s permission", what, self.permission)
            await send(REFUSED_NOT_AUTHORIZED, extra={0x0902: f"calling AE may not {self.permission}"})
            return
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
        status, comment = failure_status(exc)
        if comment.startswith("internal error"):
            log.exception("%s failed", what)
        log.warning("%s failed before any sub-operation: 0x%04X %s", what, status, comment)
        extra: dict[int, int | str | tuple[int, ...]] = {0x0902: comment[:64]}
        if isinstance(exc, RetrieveError) and exc.offending:
            extra[0x0901] = exc.offending
        await send(status, extra=extra)

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
            # Cut short after sending began: what it listed is accounted for, the
            # rest is unknown, so the move cannot end in success.
            status, comment = failure_status(listing.error)
            extra[0x0902] = comment[:64]
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
