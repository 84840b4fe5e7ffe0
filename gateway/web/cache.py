"""The facade's bounded on-disk cache of what a remote upstream sent: frames as stored
and metadata, so a viewer scrolling a series twice costs the archive one pass, and
frames converted to another syntax, so it costs the gateway one decode.

A SOP Instance UID names one immutable object, so frames and instance metadata are kept
until evicted (least recently used first once ``http.cache.max_mb`` is reached) or until
a DELETE through the facade drops the study's entries; study and series metadata change
as instances arrive, so they are reused only ``http.cache.metadata_seconds``, and are
dropped at once when instances of theirs are stored (STOW-RS through the facade, and
again when the forwarder delivers any instance), with the stored instances' own
entries (Azure's PUT replaces an instance). An answer fetched while a study's entries
were dropped is not kept: it may predate the change.

A series' metadata also keeps each of its instances' (immutable, like theirs fetched
alone), and the frame routes take an instance's from its series' (`instance_metadata`): a
viewer asks a series' metadata before its frames, and each frame needs its instance's
pixel description, so one request to the archive answers a whole series' instead of one
per frame. Concurrent misses in one series share the one request.

The index lives in memory and the files an earlier run left are removed at start, so
nothing stale from an earlier run (or another upstream) is ever served. Values are read whole
before use, so an entry evicted by a concurrent request never breaks an answer.

Entries are written back to back into *segment* files (a sixteenth of the bound each, so
the descriptors kept open stay few whatever the bound), by ``pwrite`` and read by
``pread`` through a descriptor kept open, not a file each: a cold frame kept two files (as stored and converted), and creating them was
a quarter of the gateway's CPU per cold frame on ext4 without a journal, whose inode
allocator steps over every inode deleted in the last minute (an evicting cache deletes
many). The bound counts the segments' bytes, and the segment used least recently goes
whole (its entries with it) when they exceed it: with one entry per segment, as in a
small cache, that is exact LRU.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gateway.log_throttle import Throttle, left_out
from gateway.metrics import Metrics
from gateway.spill import SpillArea
from gateway.uids import is_valid_uid, json_uid
from gateway.upstream.base import Frame, JsonObject
from gateway.web.bulk_uris import FACADE_ROOT, point_at_facade

log = logging.getLogger("gateway.web")
# Asks the archive for metadata (a study's, a series' or an instance's).
MetadataFetch = Callable[[], Awaitable[Sequence[JsonObject]]]
_NEAR_FLOOR = Throttle()  # a disk near its floor skips every write alike
_WRITE_FAILED = Throttle()  # so does a full one (the cache on a small disk of its own)
# What a cache writes: segment files, and (from versions before segments) entry files.
_ENTRY_NAME = re.compile(r"segment-[0-9]+|[0-9a-f]{64}(\.[0-9a-f]{32}\.tmp)?")
# Studies whose changes are counted (a fetch that saw a count vanish keeps nothing).
CHANGES_KEPT = 10_000
# Instances whose derived values (`derived`) are kept in memory.
DERIVED_KEPT = 10_000


class _Segment:
    """One cache file: entries back to back, or one video. Its descriptor closes when
    the last holder lets go, so a read that began before an eviction still completes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        weakref.finalize(self, os.close, self.fd)
        self.end = 0  # bytes placed (written or being written)
        self.keys: set[str] = set()  # the entries it holds
        self.pending = 0  # values placed but not yet written


@dataclass(frozen=True)
class KeptVideo:
    """A video stream in the cache, read by ranges through its segment's descriptor:
    held, it keeps the segment open, so an eviction meanwhile cuts no range short."""

    segment: _Segment
    offset: int
    size: int
    media: str

    def read(self, start: int, size: int) -> bytes:
        """Bytes ``[start, start + size)`` of the stream (blocking)."""
        data = os.pread(self.segment.fd, size, self.offset + start)
        if len(data) != size:
            raise OSError(errno.EIO, "the kept video ends early")
        return data


@dataclass
class _Entry:
    segment: _Segment
    offset: int
    size: int
    syntax: str  # a frame's transfer syntax; "" for metadata
    expires: float  # monotonic time; 0: never


class FacadeCache:
    """``await cache.metadata(study, series, sop, fetch)``, ``cache.frames(...)``."""

    def __init__(self, directory: Path, max_bytes: int, metadata_seconds: float, metrics: Metrics | None = None) -> None:
        """``metrics``: where each lookup counts as a hit or a miss."""
        self.metrics = metrics
        self.directory = directory
        self.max_bytes = max_bytes
        self.metadata_seconds = metadata_seconds
        self.index: OrderedDict[str, _Entry] = OrderedDict()
        # study UID -> its keys, so dropping a study's entries never walks the whole index
        self._by_study: dict[str, set[str]] = {}
        self.bytes = 0  # the entries' bytes
        # segments in order of last use (least recent first); the one being filled
        self._segments: OrderedDict[_Segment, None] = OrderedDict()
        self._filling: _Segment | None = None
        self._segment_bytes = max(1, max_bytes // 16)
        self._segment_count = 0
        self.disk_bytes = 0  # the segments' bytes: what the bound counts
        self._changes: dict[str, int] = {}  # study UID -> times its entries were dropped
        # series key -> when its metadata was last fetched (monotonic), kept as long as
        # series metadata is: an instance missing from it meanwhile is fetched alone
        self._series_read: OrderedDict[str, float] = OrderedDict()
        self._series_fetches: dict[str, asyncio.Task[tuple[list[JsonObject], bytes]]] = {}  # in flight
        self._videos_fetched: dict[str, asyncio.Future[None]] = {}  # video key -> kept or not
        # instance metadata key -> {name: value computed from that metadata}
        self._derived: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # On the spool's disk: near its floor nothing new is kept, and the least
        # recently used segment goes at each write skipped (C-STOREs come first).
        self.floor: SpillArea | None = None
        directory.mkdir(parents=True, exist_ok=True)
        for path in directory.iterdir():  # only what a cache wrote: the directory is the admin's
            if _ENTRY_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)

    # -- entries -------------------------------------------------------------------

    def _lookup(self, key: str) -> _Entry | None:
        entry = self.index.get(key)
        if entry is None:
            return None
        if entry.expires and entry.expires < time.monotonic():
            self._drop(key)
            return None
        self.index.move_to_end(key)
        if entry.segment in self._segments:
            self._segments.move_to_end(entry.segment)
        return entry

    def _drop(self, key: str) -> None:
        """Remove ``key`` from the index; its segment goes once it holds nothing more."""
        entry = self.index.pop(key)
        self.bytes -= entry.size
        self._derived.pop(key, None)
        study = key.split("/", 1)[0]
        keys = self._by_study[study]
        keys.discard(key)
        if not keys:
            del self._by_study[study]
        entry.segment.keys.discard(key)
        self._release(entry.segment)

    def _release(self, segment: _Segment) -> None:
        """Remove ``segment`` when it holds no entry, awaits no write and is not filling."""
        if not segment.keys and not segment.pending and segment is not self._filling and segment in self._segments:
            self._drop_segment(segment)

    def _drop_segment(self, segment: _Segment) -> None:
        """Remove ``segment`` and every entry in it."""
        del self._segments[segment]
        if segment is self._filling:
            self._filling = None
        self.disk_bytes -= segment.end
        for key in list(segment.keys):
            self._drop(key)
        segment.path.unlink(missing_ok=True)

    def _new_segment(self) -> _Segment:
        self._segment_count += 1
        segment = _Segment(self.directory / f"segment-{self._segment_count}")
        self._segments[segment] = None
        return segment

    def _place(self, size: int) -> tuple[_Segment, int]:
        """Where a value of ``size`` bytes goes: the end of the segment being filled, or
        of a new one when it would overflow it (a value larger than a segment fills
        one alone)."""
        segment = self._filling
        if segment is None or (segment.end and segment.end + size > self._segment_bytes):
            self._filling = None
            if segment is not None:
                self._release(segment)
            segment = self._filling = self._new_segment()
        offset = segment.end
        segment.end += size
        segment.pending += 1
        self.disk_bytes += size
        self._segments.move_to_end(segment)
        return segment, offset

    async def _read(self, key: str) -> tuple[bytes, str] | None:
        entry = self._lookup(key)
        if entry is None:
            return None
        try:
            data = await asyncio.to_thread(os.pread, entry.segment.fd, entry.size, entry.offset)
        except OSError as exc:
            log.warning("facade cache: cannot read an entry: %s", exc.strerror or type(exc).__name__)
            data = b""
        if len(data) != entry.size:  # its file cut short (not by the cache)
            if self.index.get(key) is entry:
                self._drop(key)
            return None
        return data, entry.syntax

    async def _write(self, key: str, data: bytes, syntax: str, expires: float) -> None:
        """Keep ``data`` under ``key``, evicting the least recently used entries to stay
        within the bound; a value larger than the whole cache is not kept."""
        await self._write_many([(key, data)], syntax, expires)

    async def _write_many(self, items: Sequence[tuple[str, bytes]], syntax: str, expires: float) -> None:
        """`_write` of each (key, data), the values written in one worker-thread call."""
        if self.floor is not None and self.floor.near_floor():
            if self._segments:
                self._drop_segment(next(iter(self._segments)))
            admitted, held = _NEAR_FLOOR.admit()
            if admitted:
                log.warning(
                    "facade cache: nothing kept, and its oldest entries dropped: the spool's disk is near "
                    "spool.min_free_mb%s", left_out(held),
                )
            return
        try:
            placed = [(key, data, *self._place(len(data))) for key, data in items if len(data) <= self.max_bytes]
        except OSError as exc:  # no new segment file
            self._write_failed(exc, [])
            return
        if not placed:
            return
        failure: OSError | None = None
        try:
            await asyncio.to_thread(_write_values, [(segment.fd, data, offset) for _, data, segment, offset in placed])
        except OSError as exc:
            failure = exc
        for key, data, segment, offset in placed:
            if failure is None and segment in self._segments:  # (not evicted while written)
                self._admit(key, segment, offset, len(data), syntax, expires)
            segment.pending -= 1  # after: replacing a key must not release its segment
        touched = {segment for _, _, segment, _ in placed}
        if failure is not None:
            self._write_failed(failure, touched)
            return
        for segment in touched:
            self._release(segment)
        self._evict()

    def _write_failed(self, exc: OSError, touched: Iterable[_Segment]) -> None:
        """After a write that failed (a full disk: the cache on a small one of its own):
        the segments it wrote into go, since their ends count bytes that are not there,
        and the oldest one with them, so the next entries find room; a throttled
        WARNING says so. Frames are served all the same, just not kept."""
        for segment in [*touched, *list(self._segments)[:1]]:
            if segment in self._segments:
                self._drop_segment(segment)
        admitted, held = _WRITE_FAILED.admit()
        if admitted:
            log.warning(
                "facade cache: cannot write an entry (%s); its oldest entries dropped to make room%s",
                exc.strerror or type(exc).__name__, left_out(held),
            )

    def _admit(self, key: str, segment: _Segment, offset: int, size: int, syntax: str, expires: float) -> None:
        """Index the value just written for ``key`` (replacing its entry)."""
        if key in self.index:
            self._drop(key)
        self.index[key] = _Entry(segment, offset, size, syntax, expires)
        segment.keys.add(key)
        self._by_study.setdefault(key.split("/", 1)[0], set()).add(key)
        self.bytes += size

    def _evict(self) -> None:
        """Drop the least recently used segments until the cache is within its bound."""
        while self.disk_bytes > self.max_bytes and self._segments:
            self._drop_segment(next(iter(self._segments)))

    def forget_study(self, study: str) -> None:
        """Drop every entry of ``study`` (after a DELETE of it or of anything in it)."""
        self._forget(study, (f"{study}/",))

    def forget_stored(self, study: str, instances: Iterable[tuple[str, str]]) -> None:
        """Drop what storing ``instances`` ((series UID, SOP Instance UID) pairs of
        ``study``) makes stale: the study's metadata, their series' metadata, and their
        own metadata and frames (a stored instance may replace one)."""
        prefixes = {f"{study}///metadata"}
        for series, sop in instances:
            prefixes |= {f"{study}/{series}//metadata", f"{study}/{series}/{sop}/"}
        self._forget(study, tuple(prefixes))

    def _forget(self, study: str, prefixes: tuple[str, ...]) -> None:
        self._changes[study] = self._changes.pop(study, 0) + 1
        if len(self._changes) > CHANGES_KEPT:  # the longest unchanged study is forgotten
            del self._changes[next(iter(self._changes))]
        for key in [k for k in self._by_study.get(study, ()) if k.startswith(prefixes)]:
            self._drop(key)

    def _count(self, kind: str, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.cache_lookups.labels(kind, "hit" if hit else "miss").inc()

    # -- what the routes ask ---------------------------------------------------------

    async def metadata(
        self,
        study: str,
        series: str | None,
        sop: str | None,
        fetch: Callable[[], Awaitable[Sequence[JsonObject]]],
        image_set: str | None = None,
    ) -> list[JsonObject]:
        """The metadata at the level the UIDs name (in the HealthImaging image set
        ``image_set`` when given: kept apart), from the cache or from ``fetch``."""
        got = await self._metadata(study, series, sop, fetch, image_set)
        return list(json.loads(got)) if isinstance(got, bytes) else got[0]

    async def metadata_body(
        self, study: str, series: str | None, sop: str | None, fetch: MetadataFetch, image_set: str | None = None
    ) -> bytes:
        """`metadata` as the JSON text of its answer, BulkDataURIs under `FACADE_ROOT`
        (see `bulk_uris.with_root`): a kept answer is served as it was kept."""
        got = await self._metadata(study, series, sop, fetch, image_set)
        return got if isinstance(got, bytes) else got[1]

    async def _metadata(
        self, study: str, series: str | None, sop: str | None, fetch: MetadataFetch, image_set: str | None
    ) -> bytes | tuple[list[JsonObject], bytes]:
        """The kept text of the metadata the UIDs name, or else what fetching it gave
        (the objects and their text)."""
        key = _metadata_key(study, series, sop, image_set)
        cached = await self._read(key)
        self._count("metadata", cached is not None)
        if cached is not None:
            return cached[0]
        if series and not sop:
            return await self._series_metadata(study, series, fetch, image_set)
        return await self._fetch_level(key, study, sop, fetch)

    async def _fetch_level(
        self, key: str, study: str, sop: str | None, fetch: Callable[[], Awaitable[Sequence[JsonObject]]]
    ) -> tuple[list[JsonObject], bytes]:
        """A study's or an instance's metadata from ``fetch``, kept (a study's for
        ``metadata_seconds``), with its text."""
        before = self._changes.get(study)
        objects = list(await fetch())
        texts = _texts(objects, study)
        body = _array(texts)
        expires = 0.0 if sop else time.monotonic() + self.metadata_seconds
        if (sop or self.metadata_seconds > 0) and self._changes.get(study) == before:
            await self._write(key, body, "", expires)
        return objects, body

    async def instance_metadata(
        self,
        study: str,
        series: str,
        sop: str,
        fetch_series: Callable[[], Awaitable[Sequence[JsonObject]]],
        fetch_instance: Callable[[], Awaitable[Sequence[JsonObject]]],
        image_set: str | None = None,
    ) -> list[JsonObject]:
        """An instance's metadata, from the cache or else from its series' (kept for
        every instance of it); from ``fetch_instance`` when the series' could not be read,
        or lacks the instance, or was read within ``metadata_seconds`` without it."""
        key = _metadata_key(study, series, sop, image_set)
        cached = await self._read(key)
        self._count("metadata", cached is not None)
        if cached is not None:
            return list(json.loads(cached[0]))
        series_key = _metadata_key(study, series, None, image_set)
        read_at = self._series_read.get(series_key)
        if series_key in self._series_fetches or read_at is None or read_at + self.metadata_seconds < time.monotonic():
            try:
                objects = (await self._series_metadata(study, series, fetch_series, image_set))[0]
            except Exception as exc:  # noqa: BLE001 - the instance's own request says what is wrong
                log.debug("facade cache: series metadata of %s unread: %s", series, exc)
            else:
                found = [o for o in objects if json_uid(o, "00080018") == sop and json_uid(o, "0020000E") in (series, None)]
                if found:
                    return found
        before = self._changes.get(study)
        objects = list(await fetch_instance())
        body = _array(_texts(objects, study))
        if self._changes.get(study) == before:
            await self._write(key, body, "", 0.0)
        return objects

    async def _series_metadata(
        self, study: str, series: str, fetch: Callable[[], Awaitable[Sequence[JsonObject]]], image_set: str | None
    ) -> tuple[list[JsonObject], bytes]:
        """A series' metadata from ``fetch``, with its text, one request at a time per
        series (a caller that goes away leaves it to the others); kept for
        ``metadata_seconds``, and each instance's part of it for good."""
        series_key = _metadata_key(study, series, None, image_set)
        task = self._series_fetches.get(series_key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_series(study, series, fetch, image_set))
            self._series_fetches[series_key] = task

            def done(finished: asyncio.Task[tuple[list[JsonObject], bytes]]) -> None:
                self._series_fetches.pop(series_key, None)
                if not finished.cancelled():
                    finished.exception()  # retrieved, though every caller may have gone

            task.add_done_callback(done)
        return await asyncio.shield(task)

    async def _fetch_series(
        self, study: str, series: str, fetch: Callable[[], Awaitable[Sequence[JsonObject]]], image_set: str | None
    ) -> tuple[list[JsonObject], bytes]:
        series_key = _metadata_key(study, series, None, image_set)
        self._series_read[series_key] = time.monotonic()  # tried: failing or not, not again at once
        self._series_read.move_to_end(series_key)
        if len(self._series_read) > CHANGES_KEPT:
            del self._series_read[next(iter(self._series_read))]
        before = self._changes.get(study)
        objects = list(await fetch())
        # Each object serialised once, for the answer, its own entry and the series'
        # (serialising them again for each was a third of the facade's CPU for a
        # series' metadata).
        texts = _texts(objects, study)
        body = _array(texts)
        if self._changes.get(study) != before:
            return objects, body
        if self.metadata_seconds > 0:
            await self._write(series_key, body, "", time.monotonic() + self.metadata_seconds)
        instances = [
            (_metadata_key(study, series, sop, image_set), _array([text]))
            for o, text in zip(objects, texts)
            if is_valid_uid(sop := json_uid(o, "00080018") or "") and json_uid(o, "0020000E") in (series, None)
        ]
        if self._changes.get(study) == before:
            await self._write_many(instances, "", 0.0)
        return objects, body

    async def frames(
        self,
        study: str,
        series: str,
        sop: str,
        numbers: Sequence[int],
        fetch: Callable[[list[int]], AsyncGenerator[Frame, None]],
        image_set: str | None = None,
    ) -> AsyncGenerator[Frame, None]:
        """The frames in the order asked, each from the cache or, for each run of missing
        ones, from ``fetch(run)`` (kept as they pass), so the answer still streams."""
        pending: list[int] = []

        async def flush() -> AsyncGenerator[Frame, None]:
            run = list(pending)
            pending.clear()
            before = self._changes.get(study)
            async with contextlib.aclosing(fetch(run)) as fetched:  # its cleanup runs if the client goes
                async for frame in fetched:
                    key = _frame_key(study, series, sop, frame.number, image_set)
                    # (kept already when cut with its whole instance: `keep_frames`)
                    if self._changes.get(study) == before and key not in self.index:
                        await self._write(key, frame.data, frame.transfer_syntax, 0.0)
                    yield frame

        for number in [*numbers, 0]:  # 0: the end, where the last missing run is fetched
            cached = await self._read(_frame_key(study, series, sop, number, image_set)) if number else None
            if number:
                self._count("frame", cached is not None)
            if cached is None and number:
                pending.append(number)
                continue
            if pending:
                async with contextlib.aclosing(flush()) as flushed:
                    async for frame in flushed:
                        yield frame
            if cached is not None:
                yield Frame(number, cached[0], cached[1])

    async def converted(
        self,
        study: str,
        series: str,
        sop: str,
        number: int,
        image_set: str | None,
        target: str,
        generation: int | None,
        make: Callable[[], Awaitable[bytes]],
    ) -> bytes:
        """Frame ``number`` in syntax ``target``, from the cache or made by ``make()``
        from the frame as stored and kept (unless the study changed since
        ``generation``): decoding is most of what a frame already cached as stored
        costs, so a viewer asking another syntax than the stored one pays it once."""
        key = _frame_key(study, series, sop, number, image_set, target)
        cached = await self._read(key)
        self._count("converted", cached is not None)
        if cached is not None:
            return cached[0]
        data = await make()
        if self._changes.get(study) == generation:
            await self._write(key, data, target, 0.0)
        return data

    async def kept_converted(
        self, study: str, series: str, sop: str, numbers: Sequence[int], image_set: str | None, target: str
    ) -> list[bytes] | None:
        """The frames ``numbers`` converted to ``target`` when the cache holds every
        one (each counted a `converted` hit), else None (nothing counted: `converted`
        counts each lookup then)."""
        keys = [_frame_key(study, series, sop, number, image_set, target) for number in numbers]
        if not all(key in self.index for key in keys):
            return None
        found = await self._read_all(keys)
        if found is None:  # evicted meanwhile
            return None
        for _ in found:
            self._count("converted", True)
        return [data for data, _ in found]

    def video(self, study: str, series: str, sop: str, image_set: str | None) -> KeptVideo | None:
        """The kept video stream of an instance, None when not kept. A video is served
        by byte ranges, each a new request: without this, every range (every seek)
        would retrieve the whole instance from the archive again."""
        entry = self._lookup(_video_key(study, series, sop, image_set))
        self._count("video", entry is not None)
        return KeptVideo(entry.segment, entry.offset, entry.size, entry.syntax) if entry is not None else None

    async def video_kept(self, study: str, series: str, sop: str, image_set: str | None) -> KeptVideo | None:
        """`video`, after waiting for a request retrieving the instance for its stream
        (`fetching_video`) to keep it or give up."""
        pending = self._videos_fetched.get(_video_key(study, series, sop, image_set))
        if pending is not None:
            await asyncio.shield(pending)
        return self.video(study, series, sop, image_set)

    def fetching_video(self, study: str, series: str, sop: str, image_set: str | None) -> Callable[[], None]:
        """Make `video_kept` wait while this request retrieves the instance, until the
        function returned is called (once the stream is kept, or not; more calls do
        nothing). A request already doing so is left to go on alone."""
        key = _video_key(study, series, sop, image_set)
        if key in self._videos_fetched:
            return lambda: None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._videos_fetched[key] = done

        def let_go() -> None:
            if self._videos_fetched.get(key) is done:
                del self._videos_fetched[key]
            if not done.done():
                done.set_result(None)

        return let_go

    async def keep_video(
        self,
        study: str,
        series: str,
        sop: str,
        image_set: str | None,
        media: str,
        size: int,
        write: Callable[[BinaryIO], None],
        generation: int | None,
    ) -> KeptVideo | None:
        """Keep an instance's video stream of ``size`` bytes, written by ``write`` into a
        file (blocking, run in a worker thread), unless it is larger than a quarter of
        the cache or the study changed since ``generation``; what was kept, or None."""
        key = _video_key(study, series, sop, image_set)
        if size > self.max_bytes // 4 or self._changes.get(study) != generation:
            return None
        try:
            segment = self._new_segment()  # a segment of its own: `write` streams it whole
        except OSError as exc:
            log.warning("facade cache: cannot keep a video: %s", exc.strerror or type(exc).__name__)
            return None
        segment.end = size
        segment.pending = 1
        self.disk_bytes += size
        try:
            await asyncio.to_thread(_write_into, segment.fd, write)
        except OSError as exc:
            log.warning("facade cache: cannot keep a video: %s", exc.strerror or type(exc).__name__)
            written = False
        else:
            written = True
        if written and segment in self._segments and self._changes.get(study) == generation:
            self._admit(key, segment, 0, size, media, 0.0)
        segment.pending = 0
        self._release(segment)
        self._evict()  # never this entry: it is the newest, and at most a quarter of the bound
        return KeptVideo(segment, 0, size, media) if key in self.index else None

    def derived(self, study: str, series: str, sop: str, image_set: str | None, name: str) -> Any | None:
        """What `remember` kept under ``name`` for an instance, while its metadata is
        in the cache (a hit on that metadata), else None. A frame request needs its
        instance's pixel description; reading and parsing the metadata entry for it
        was half of what a frame cached as stored cost."""
        key = _metadata_key(study, series, sop, image_set)
        values = self._derived.get(key)
        if values is None or name not in values or self._lookup(key) is None:
            return None
        self._derived.move_to_end(key)
        self._count("metadata", True)
        return values[name]

    def remember(
        self, study: str, series: str, sop: str, image_set: str | None, name: str, value: Any, generation: int | None
    ) -> None:
        """Keep ``value``, computed from the instance's metadata as read after
        ``generation``, for as long as that metadata stays in the cache (not when the
        study changed meanwhile, or the metadata is not kept)."""
        key = _metadata_key(study, series, sop, image_set)
        if self._changes.get(study) != generation or key not in self.index:
            return
        self._derived.setdefault(key, {})[name] = value
        self._derived.move_to_end(key)
        if len(self._derived) > DERIVED_KEPT:
            del self._derived[next(iter(self._derived))]

    def generation(self, study: str) -> int | None:
        """How many times ``study``'s entries were dropped so far: an answer fetched
        while this changed may predate the change and is not kept."""
        return self._changes.get(study)

    async def keep_frames(
        self, study: str, series: str, sop: str, frames: Sequence[Frame], image_set: str | None, generation: int | None
    ) -> None:
        """Keep frames (one instance's, in one syntax) cut from its instance retrieved
        whole, unless the study changed since ``generation``."""
        if not frames or self._changes.get(study) != generation:
            return
        items = [(_frame_key(study, series, sop, f.number, image_set), f.data) for f in frames]
        await self._write_many(items, frames[0].transfer_syntax, 0.0)

    async def kept_frames(
        self, study: str, series: str, sop: str, numbers: Sequence[int], image_set: str | None
    ) -> list[Frame] | None:
        """The frames ``numbers`` when the cache holds every one, else None. (Not
        counted as lookups: `frames` counted them when it missed.)"""
        found = await self._read_all([_frame_key(study, series, sop, number, image_set) for number in numbers])
        if found is None:
            return None
        return [Frame(number, data, syntax) for number, (data, syntax) in zip(numbers, found, strict=True)]

    async def _read_all(self, keys: Sequence[str]) -> list[tuple[bytes, str]] | None:
        """Every entry of ``keys`` (value, syntax), or None as soon as one is missing."""
        found = []
        for key in keys:
            cached = await self._read(key)
            if cached is None:
                return None
            found.append(cached)
        return found


def _scope(image_set: str | None) -> str:
    """The key suffix of entries read from a named image set."""
    return f"@{image_set}" if image_set else ""


def _metadata_key(study: str, series: str | None, sop: str | None, image_set: str | None) -> str:
    """The key of metadata at the level the UIDs name. Every key starts with its study's
    UID and then the series' and the instance's, so a study's or an instance's entries
    are found by prefix (`_forget`)."""
    return f"{study}/{series or ''}/{sop or ''}/metadata{_scope(image_set)}"


def _frame_key(study: str, series: str, sop: str, number: int, image_set: str | None, target: str = "") -> str:
    """The key of a frame as stored, or converted to ``target``."""
    return f"{study}/{series}/{sop}/frame/{number}{_scope(image_set)}" + (f">{target}" if target else "")


def _video_key(study: str, series: str, sop: str, image_set: str | None) -> str:
    """The key of an instance's video stream."""
    return f"{study}/{series}/{sop}/video{_scope(image_set)}"


def _texts(objects: list[JsonObject], study: str) -> list[str]:
    """Each object as JSON, its BulkDataURIs pointed at the facade under `FACADE_ROOT`
    (``study``: the one asked, for an object without its own). The objects are changed
    in place, so callers taking them get them so; the answer's `point_at_facade`
    points them at the request's root as it does the archive's URIs."""
    texts = []
    for obj in objects:
        if isinstance(obj, dict):
            point_at_facade(obj, FACADE_ROOT, study)
        texts.append(json.dumps(obj, ensure_ascii=False))
    return texts


def _array(texts: list[str]) -> bytes:
    """The JSON array of objects serialised apart: what ``json.dumps`` of the list gives."""
    return f"[{', '.join(texts)}]".encode("utf-8")


def _write_values(items: Sequence[tuple[int, bytes, int]]) -> None:
    """Write each (descriptor, data, offset) whole (an entry is indexed only after)."""
    for fd, data, offset in items:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written


def _write_into(fd: int, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill the file of ``fd`` from its start (blocking)."""
    with os.fdopen(os.dup(fd), "wb") as out:
        write(out)


# -- HTTP validators -----------------------------------------------------------------


def etag_for(*parts: Any) -> str:
    """A weak validator naming a representation by what determines it (UIDs, frame
    numbers, media type and syntax): the objects behind them never change."""
    digest = hashlib.sha256("\n".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:32]
    return f'W/"{digest}"'


def content_etag(body: bytes) -> str:
    """A strong validator of a body built whole (metadata)."""
    return f'"{hashlib.sha256(body).hexdigest()[:32]}"'


def not_modified(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    wanted = etag.removeprefix("W/")
    return any(tag.strip() == "*" or tag.strip().removeprefix("W/") == wanted for tag in if_none_match.split(","))
