"""Frames cut out of an instance retrieved whole, once for all of its frames.

When the archive will not serve an instance's frames (Orthanc 1.10 answers 500 to
RetrieveFrames of some stored syntaxes; see `RefusedSeries`), the facade retrieves the
instance and cuts the frames out. A viewer asks a multi-frame instance's frames a few
at a time, several requests at once (OHIF), so cutting only the frames asked would
retrieve the whole instance again for every request: a thousand retrievals of a
thousand-frame instance. Here the first request retrieves it and cuts every frame into
the facade's cache, a batch at a time (memory holds a batch of frames, never the
instance) and answers its own request from what it cut; requests for the same instance
arriving meanwhile wait for that and take their frames from the cache.

Of an instance larger than a quarter of the cache only the frames the request asked are
cut, and none kept (keeping all its frames would evict what was just cut); later
requests for it ask the archive for their frames as ELE (`ask_as_ele`), and retrieve it
on their own only if that is refused too. One whose frames cannot be read one by one
(`frames_as_stored`) keeps the per-request path.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import BinaryIO

from gateway.codecs.errors import TranscodeError
from gateway.codecs.stream import frames_as_stored
from gateway.retrieval.request import InstanceRef
from gateway.upstream.base import Frame, Retrieved
from gateway.web.cache import FacadeCache

log = logging.getLogger("gateway.web")

# Frames cut per worker-thread trip, and written to the cache at once.
CUT_BATCH = 16
# Instances remembered as too large to keep.
LARGE_KEPT = 10_000


class WholeInstanceFrames:
    """``await frames(ref, numbers, image_set, retrieve)``; one cut at a time per instance."""

    def __init__(self, cache: FacadeCache) -> None:
        self.cache = cache
        self._running: dict[str, asyncio.Task[dict[int, Frame] | None]] = {}
        # instances found too large to keep -> whether RetrieveFrames as ELE may serve
        # them (False once the archive refused that too); the oldest forgotten first
        self._large: OrderedDict[str, bool] = OrderedDict()

    def ask_as_ele(self, ref: InstanceRef, image_set: str | None) -> bool:
        """Whether ``ref``'s frames are better asked of the archive as Explicit VR Little
        Endian than cut from the instance: it was found too large to keep, and the
        archive has not refused that ask yet. Orthanc 1.10, which refuses HTJ2K frames
        as stored, serves them as stored to that ask (labelled ELE; the facade checks
        each frame's bytes), parsing its own file instead of sending the whole instance:
        20 frames of a 128 MB instance, 4 requests at a time, 13.7 -> 6.1 s."""
        return self._large.get(_key(ref, image_set), False)

    def ele_refused(self, ref: InstanceRef, image_set: str | None) -> None:
        """The archive refused ``ref``'s frames as ELE too: cut them from the instance."""
        self._remember_large(_key(ref, image_set), False)

    def _remember_large(self, key: str, ask_as_ele: bool) -> None:
        self._large.pop(key, None)
        self._large[key] = ask_as_ele
        if len(self._large) > LARGE_KEPT:
            del self._large[next(iter(self._large))]

    async def frames(
        self,
        ref: InstanceRef,
        numbers: Sequence[int],
        image_set: str | None,
        retrieve: Callable[[], Awaitable[Retrieved]],
    ) -> list[Frame] | None:
        """The frames ``numbers`` of ``ref``, cut with all the others from the instance
        ``retrieve()`` gives (one retrieval shared by concurrent requests), or None when
        they could not be had that way: the caller then cuts its own. Raises what
        ``retrieve`` raises."""
        key = _key(ref, image_set)
        task = self._running.get(key)
        if task is None:
            task = asyncio.create_task(self._cut_all(ref, image_set, retrieve, set(numbers)))
            self._running[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
            # Shielded: a viewer that goes away leaves the cut to finish for the others.
            cut = await asyncio.shield(task)
            return None if cut is None else [cut[n] for n in numbers]
        if await asyncio.shield(task) is None:
            return None
        return await self.cache.kept_frames(ref.study_uid, ref.series_uid, ref.sop_instance_uid, numbers, image_set)

    def _finished(self, key: str, task: asyncio.Task[dict[int, Frame] | None]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # read here, so one nobody waits for any more is not reported as lost

    async def _cut_all(
        self,
        ref: InstanceRef,
        image_set: str | None,
        retrieve: Callable[[], Awaitable[Retrieved]],
        wanted: set[int],
    ) -> dict[int, Frame] | None:
        """Retrieve the instance and keep each of its frames in the cache (unless it is
        larger than a quarter of the cache); the frames ``wanted`` by the request that
        started the cut, or None when not every frame could be cut (the cache keeps
        those that were)."""
        generation = self.cache.generation(ref.study_uid)
        retrieved = await retrieve()
        reader = _Reader(retrieved)
        found: dict[int, Frame] = {}
        # Too large to keep whole: only the frames wanted are cut from this retrieval
        # (not retrieved again by the caller), and nothing is kept.
        keep = retrieved.length <= self.cache.max_bytes // 4
        if not keep:
            self._remember_large(_key(ref, image_set), True)
        try:
            batch = await asyncio.to_thread(reader.first, CUT_BATCH)
            cut = 0
            while batch:
                kept = [Frame(cut + n, data, reader.syntax) for n, data in enumerate(batch, start=1)]
                cut += len(batch)
                found.update((f.number, f) for f in kept if f.number in wanted)
                if keep:
                    await self.cache.keep_frames(
                        ref.study_uid, ref.series_uid, ref.sop_instance_uid, kept, image_set, generation
                    )
                elif len(found) == len(wanted):
                    break
                if len(batch) < CUT_BATCH:
                    break
                batch = await asyncio.to_thread(reader.next, CUT_BATCH)
        except TranscodeError as exc:
            log.debug("instance %s: frames not cut whole: %s", ref.sop_instance_uid, exc)
            return None
        finally:
            reader.close()
            retrieved.release()
        return found if len(found) == len(wanted) else None


def _key(ref: InstanceRef, image_set: str | None) -> str:
    return f"{ref.sop_instance_uid}@{image_set or ''}"


class _Reader:
    """A retrieved instance's frames, read a batch at a time (blocking methods: run in a
    worker thread; the first also opens the file and reads the header, so a one-frame
    instance costs one trip)."""

    def __init__(self, retrieved: Retrieved) -> None:
        self.retrieved = retrieved
        self.syntax = ""
        self._fp: BinaryIO | None = None
        self._frames: Iterator[bytes] = iter(())

    def first(self, count: int) -> list[bytes]:
        self._fp = _open(self.retrieved)
        self.syntax, self._frames = frames_as_stored(self._fp)
        return self.next(count)

    def next(self, count: int) -> list[bytes]:
        return list(itertools.islice(self._frames, count))

    def close(self) -> None:
        if self._fp is not None:
            self._fp.close()


def _open(retrieved: Retrieved) -> BinaryIO:
    """The retrieved Part 10 file, positioned at its start (blocking)."""
    if retrieved.data is not None:
        return io.BytesIO(retrieved.read())
    assert retrieved.path is not None
    fp = open(retrieved.path, "rb")  # noqa: SIM115 - closed by the caller
    fp.seek(retrieved.offset)
    return fp

