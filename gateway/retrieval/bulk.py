"""Whole studies or series read in one request each.

For a STUDY or SERIES request whose study is named the archive answers a
RetrieveStudy/RetrieveSeries, and those answers are the list of what is due, checked
against the archive's count of the scopes (`Listing`): an instance search costs an
archive about as much per instance as the retrieval does, so it runs only for what
the bulk answers lacked (or brought before failing), which is then fetched alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from gateway.retrieval.request import InstanceRef, RetrieveRequest
from gateway.retrieval.source import Fetched, inspect
from gateway.spill import SpillArea, SpillFull
from gateway.upstream.base import Capabilities, Upstream
from gateway.upstream.errors import NotFound, UpstreamError

log = logging.getLogger("gateway.retrieval")

Scope = tuple[str, str | None]  # (study UID, series UID or None for the whole study)


def bulk_scopes(request: RetrieveRequest, capabilities: Capabilities) -> list[Scope] | None:
    """The studies or series the request names with their study, to read whole; None
    when it names neither (the series of a study not named, single instances), or the
    archive cannot retrieve at that level (AWS HealthImaging has neither study nor
    series retrieve): then every instance is fetched on its own."""
    if request.level == "STUDY" and capabilities.study_retrieve:
        return [(study, None) for study in request.study_uids]
    if request.level == "SERIES" and request.study_uids and capabilities.series_retrieve:
        return [(request.study_uids[0], series) for series in request.series_uids]
    return None


class BulkFeed:
    """Instances of whole studies or series, read by one WADO-RS request each, in a
    task of their own so that they arrive while the search is still answering.

    What has arrived waits here, up to ``limit`` instances and ``max_bytes`` in memory
    (the engine's look-ahead, which is then complete by the time the search answers);
    then reading pauses, which pauses the archive through TCP. Answers above
    ``spill_bytes`` wait in files under ``spill_area``; reading pauses too while they
    hold the disk near its floor. A failed or unreadable answer
    ends the feed (what it lacks is then fetched alone), logged once, never raised.
    """

    def __init__(
        self,
        upstream: Upstream,
        scopes: list[Scope],
        spill_area: SpillArea,
        spill_bytes: int,
        limit: int,
        max_bytes: int,
        what: str,
    ) -> None:
        self.upstream = upstream
        self.spill_area = spill_area
        self.spill_bytes = spill_bytes
        self.max_bytes = max_bytes
        self.what = what
        self.scopes = scopes
        self._queue: asyncio.Queue[Fetched | None] = asyncio.Queue(maxsize=max(limit, 1))
        self._held = 0  # bytes of the waiting in-memory instances
        self._room = asyncio.Event()
        self._task = asyncio.create_task(self._read(scopes))

    @staticmethod
    def _in_memory(item: Fetched) -> int:
        r = item.retrieved
        return r.length if r is not None and r.data is not None else 0

    async def _read(self, scopes: list[Scope]) -> None:
        refused, reason = 0, ""
        paused = False  # said once
        try:
            for study_uid, series_uid in scopes:
                answer = self.upstream.iter_instances(study_uid, series_uid, self.spill_area, self.spill_bytes)
                async with contextlib.aclosing(answer):
                    async for retrieved in answer:
                        item = Fetched(InstanceRef(study_uid, series_uid or "", "", ""), retrieved)
                        try:
                            item.transfer_syntax, item.sop_class_uid, sop_instance, item.dataset_offset = await inspect(
                                retrieved, study_uid, series_uid or ""
                            )
                            item.ref = replace(item.ref, sop_instance_uid=sop_instance, sop_class_uid=item.sop_class_uid)
                            await self._queue.put(item)
                        except (ValueError, OSError) as exc:
                            item.release()  # unusable: fetched alone if the search lists it
                            refused, reason = refused + 1, reason or str(exc)
                            continue
                        except BaseException:
                            item.release()
                            raise
                        self._held += self._in_memory(item)
                        while self._held > self.max_bytes:
                            self._room.clear()
                            await self._room.wait()
                        if await self.spill_area.room() and not paused:  # near the disk's floor
                            paused = True
                            log.info("%s: reading ahead paused while the spool's disk is near spool.min_free_mb", self.what)
        except NotFound:
            pass  # nothing there; the search says the same
        except UpstreamError as exc:
            log.warning("%s: bulk retrieval stopped (%s); fetching the rest one by one", self.what, exc)
        except SpillFull as exc:
            log.warning("%s: bulk retrieval stopped (%s); fetching the rest one by one", self.what, exc.strerror)
        except Exception:  # noqa: BLE001 - whatever went wrong, the rest is fetched alone
            log.exception("%s: bulk retrieval failed; fetching the rest one by one", self.what)
        if refused:
            log.warning("%s: %d instance(s) of the archive's answer not sent (%s); those due are fetched alone", self.what, refused, reason)
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
