"""The facade's bounded on-disk cache of what a remote upstream sent: frames as stored
and metadata, so a viewer scrolling a series twice costs the archive one pass.

A SOP Instance UID names one immutable object, so frames and instance metadata are kept
until evicted (least recently used first once ``http.cache.max_mb`` is reached) or until
a DELETE through the facade drops the study's entries; study and series metadata change
as instances arrive, so they are reused only ``http.cache.metadata_seconds``, and are
dropped at once when instances of theirs are stored (STOW-RS through the facade, and
again when the forwarder delivers any instance), with the stored instances' own
entries (Azure's PUT replaces an instance). An answer fetched while a study's entries
were dropped is not kept: it may predate the change.

The index lives in memory and the entries an earlier run left are removed at start, so
nothing stale from an earlier run (or another upstream) is ever served. Values are read whole
before use, so an entry evicted by a concurrent request never breaks an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.metrics import Metrics
from gateway.upstream.base import Frame, JsonObject

log = logging.getLogger("gateway.web")
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}(\.[0-9a-f]{32}\.tmp)?")
# Studies whose changes are counted (a fetch that saw a count vanish keeps nothing).
CHANGES_KEPT = 10_000


@dataclass
class _Entry:
    path: Path
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
        self.bytes = 0
        self._changes: dict[str, int] = {}  # study UID -> times its entries were dropped
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
        return entry

    def _drop(self, key: str) -> None:
        entry = self._pop(key)
        entry.path.unlink(missing_ok=True)

    def _pop(self, key: str) -> _Entry:
        """Remove ``key`` from the index (its file stays)."""
        entry = self.index.pop(key)
        self.bytes -= entry.size
        study = key.split("/", 1)[0]
        keys = self._by_study[study]
        keys.discard(key)
        if not keys:
            del self._by_study[study]
        return entry

    async def _read(self, key: str) -> tuple[bytes, str] | None:
        entry = self._lookup(key)
        if entry is None:
            return None
        try:
            data = await asyncio.to_thread(entry.path.read_bytes)
        except FileNotFoundError:  # evicted while we read, or its file replaced and dropped
            if self.index.get(key) is entry:
                self._pop(key)
            return None
        return data, entry.syntax

    async def _write(self, key: str, data: bytes, syntax: str, expires: float) -> None:
        """Keep ``data`` under ``key``, evicting the least recently used entries to stay
        within the bound; a value larger than the whole cache is not kept."""
        if len(data) > self.max_bytes:
            return
        path = self.directory / hashlib.sha256(key.encode()).hexdigest()
        try:
            await asyncio.to_thread(_write_file, path, data)
        except OSError as exc:
            log.warning("facade cache: cannot write an entry: %s", exc.strerror or type(exc).__name__)
            return
        if key in self.index:
            self._pop(key)
        self.index[key] = _Entry(path, len(data), syntax, expires)
        self._by_study.setdefault(key.split("/", 1)[0], set()).add(key)
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self.index)))

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
        key = f"{study}/{series or ''}/{sop or ''}/metadata" + _scope(image_set)
        cached = await self._read(key)
        self._count("metadata", cached is not None)
        if cached is not None:
            return list(json.loads(cached[0]))
        before = self._changes.get(study)
        objects = list(await fetch())
        expires = 0.0 if sop else time.monotonic() + self.metadata_seconds
        if (sop or self.metadata_seconds > 0) and self._changes.get(study) == before:
            await self._write(key, json.dumps(objects).encode("utf-8"), "", expires)
        return objects

    async def frames(
        self,
        study: str,
        series: str,
        sop: str,
        numbers: Sequence[int],
        fetch: Callable[[list[int]], AsyncIterator[Frame]],
        image_set: str | None = None,
    ) -> AsyncIterator[Frame]:
        """The frames in the order asked, each from the cache or, for each run of missing
        ones, from ``fetch(run)`` (kept as they pass), so the answer still streams."""
        pending: list[int] = []
        scope = _scope(image_set)

        async def flush() -> AsyncIterator[Frame]:
            run = list(pending)
            pending.clear()
            before = self._changes.get(study)
            async with contextlib.aclosing(fetch(run)) as fetched:  # its cleanup runs if the client goes
                async for frame in fetched:
                    if self._changes.get(study) == before:
                        await self._write(f"{study}/{series}/{sop}/frame/{frame.number}{scope}", frame.data, frame.transfer_syntax, 0.0)
                    yield frame

        for number in [*numbers, 0]:  # 0: the end, where the last missing run is fetched
            cached = await self._read(f"{study}/{series}/{sop}/frame/{number}{scope}") if number else None
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


def _scope(image_set: str | None) -> str:
    """The key suffix of entries read from a named image set."""
    return f"@{image_set}" if image_set else ""


def _write_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all (a reader never sees half an entry)."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # concurrent writers of one key
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


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
