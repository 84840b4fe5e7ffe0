"""Where a retrieval's instances come from: the search's listing, the bulk answers,
and what one fetch yields.

Apart from the pipeline that consumes them (`gateway.dimse.retrieve`) because each
source runs in a task of its own with its own bound on what it holds: `Listing`
gathers the upstream search page by page, `BulkFeed` reads whole studies or series
ahead of it, and a `Fetched` instance is a Part 10 file whose File Meta
`part10_header` reads directly, without parsing the data set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gateway.dimse.requestor import DataSource, FileSlice
from gateway.dimse.retrieve_request import InstanceRef, RetrieveRequest
from gateway.structure import LONG_VRS
from gateway.upstream.base import Retrieved
from gateway.upstream.errors import NotFound, UpstreamError

if TYPE_CHECKING:
    from gateway.dimse.retrieve import Retriever

log = logging.getLogger("gateway.dimse")

# Instances fetched before the destination association is opened, so its contexts
# cover the syntaxes they are stored in (the archive's search answers do not say).
LOOKAHEAD_INSTANCES = 64
LOOKAHEAD_BYTES = 64 << 20  # of in-memory instances; spilled ones cost no memory
META_HEAD = 64 * 1024  # the File Meta group is never near this long


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
