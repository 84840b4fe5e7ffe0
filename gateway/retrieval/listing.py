"""The instances a request names, by searches on the upstream, as they arrive.

Two ways to know what is due. A request the archive also answers in bulk (a study,
a series whose study is named or found by `with_study`, a patient's studies found by
`as_studies`; see `bulk`) is *counted*: one study- or series-level search gives how
many instances each holds (NumberOf{Study,Series}RelatedInstances, a few ms of the
archive's time), the bulk answers are the list, and the instance search runs only
when they brought fewer than counted (or the count is unknown), to fetch alone what
they lacked. Listing a series costs an archive such as Orthanc about as much as
sending it (120-140 ms of its CPU for 300 instances), and sending had to wait for it.
Any other request is *listed*: the instance search is the record of what is due, and
an instance stored after it is not sent. Either way `Listing` works in a task of its
own, so sending starts with the first answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from pydicom.dataelem import DataElement

from gateway.model.json import first_text
from gateway.model.query import make_key, uid_key
from gateway.model.search import Search
from gateway.retrieval.request import (
    PATIENT_ID,
    SERIES_UID,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_UID,
    InstanceRef,
    RetrieveRequest,
)
from gateway.uids import is_valid_uid
from gateway.upstream.base import JsonObject, Upstream
from gateway.upstream.errors import NotFound, UpstreamError


def _ref(obj: JsonObject) -> InstanceRef | None:
    ref = InstanceRef(first_text(obj, STUDY_UID), first_text(obj, SERIES_UID), first_text(obj, SOP_INSTANCE_UID), first_text(obj, SOP_CLASS_UID))
    if not all(is_valid_uid(u) for u in (ref.study_uid, ref.series_uid, ref.sop_instance_uid)):
        return None  # an archive answer we could not put in a URL safely
    return ref


async def _patient_studies(upstream: Upstream, patient_id: str) -> list[str]:
    """The patient's studies, each once (the archive may match the ID loosely; the
    request is exact). Raises UpstreamError."""
    search = Search(keys=(make_key(DataElement(PATIENT_ID, "LO", patient_id)),), include=(STUDY_UID, PATIENT_ID))
    studies: list[str] = []
    async for obj in upstream.search_for_studies(search):
        if first_text(obj, PATIENT_ID) == patient_id and is_valid_uid(first_text(obj, STUDY_UID)):
            studies.append(first_text(obj, STUDY_UID))
    return list(dict.fromkeys(studies))


async def search_instances(upstream: Upstream, request: RetrieveRequest) -> AsyncIterator[InstanceRef]:
    """Every instance the request names, by QIDO on the upstream, deduplicated,
    each as soon as its page arrives."""
    include = (SOP_CLASS_UID, STUDY_UID, SERIES_UID, SOP_INSTANCE_UID)
    searches: list[Search] = []
    base = {"include": include}
    if request.level == "PATIENT":
        assert request.patient_id is not None
        studies = await _patient_studies(upstream, request.patient_id)
        searches = [Search(study_uid=s, **base) for s in studies]  # type: ignore[arg-type]
    elif request.level == "STUDY":
        searches = [Search(study_uid=s, **base) for s in request.study_uids]  # type: ignore[arg-type]
    elif request.level == "SERIES":
        study = request.study_uids[0] if request.study_uids else None
        if study:
            searches = [Search(study_uid=study, series_uid=s, **base) for s in request.series_uids]  # type: ignore[arg-type]
        else:
            searches = [Search(keys=(uid_key(SERIES_UID, request.series_uids),), **base)]  # type: ignore[arg-type]
    else:
        study = request.study_uids[0] if request.study_uids else None
        series = request.series_uids[0] if request.series_uids else None
        searches = [
            Search(
                keys=(uid_key(SOP_INSTANCE_UID, request.sop_uids),),
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
            async for obj in upstream.search_for_instances(search):
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


async def with_study(upstream: Upstream, request: RetrieveRequest) -> RetrieveRequest:
    """A SERIES request that does not name its study (SCUs leave it out), with the
    study filled in when one series search finds every series in one study: they can
    then be read in bulk and counted instead of listed and fetched one by one (300
    instances over Orthanc: 0.60 -> 0.28 s, Orthanc's CPU 0.53 -> 0.17 s). The request
    as it was otherwise, and when the search fails (the instance search decides)."""
    if request.level != "SERIES" or request.study_uids or not request.series_uids:
        return request
    studies: dict[str, str] = {}
    search = Search(keys=(uid_key(SERIES_UID, request.series_uids),), include=(STUDY_UID,))
    try:
        async for obj in upstream.search_for_series(search):
            if (series := first_text(obj, SERIES_UID)) in request.series_uids:
                studies[series] = first_text(obj, STUDY_UID)
    except UpstreamError:
        return request
    found = set(studies.values())
    if len(studies) < len(request.series_uids) or len(found) != 1 or not is_valid_uid(study := found.pop()):
        return request
    return replace(request, study_uids=(study,))


async def as_studies(upstream: Upstream, request: RetrieveRequest) -> RetrieveRequest:
    """A PATIENT request as the STUDY request for the patient's studies (one study
    search), so they can be read in bulk and counted instead of listed and fetched
    one by one. The request as it was when the patient has no study, and when the
    search fails (the instance search decides, and meets the same failure)."""
    if request.level != "PATIENT" or request.patient_id is None:
        return request
    try:
        studies = await _patient_studies(upstream, request.patient_id)
    except UpstreamError:
        return request
    return RetrieveRequest("STUDY", study_uids=tuple(studies)) if studies else request


# QIDO-RS Number of Study / Series Related Instances (PS3.18 table 10.6.3-3 and -4).
STUDY_INSTANCES = 0x00201208
SERIES_INSTANCES = 0x00201209


async def count_instances(upstream: Upstream, study: str, series: str | None) -> int | None:
    """How many instances the archive says the study (or series) holds, by one study- or
    series-level search: far cheaper for it than listing them (Orthanc: a few ms against
    120-140 ms for 300 instances). None when it does not say."""
    if series is None:
        uid_tag, count_tag = STUDY_UID, STUDY_INSTANCES
        found = upstream.search_for_studies(Search(keys=(uid_key(STUDY_UID, (study,)),), include=(count_tag,)))
    else:
        uid_tag, count_tag = SERIES_UID, SERIES_INSTANCES
        found = upstream.search_for_series(
            Search(study_uid=study, keys=(uid_key(SERIES_UID, (series,)),), include=(count_tag,))
        )
    count: int | None = None
    try:
        async for obj in found:
            if first_text(obj, uid_tag) == (series or study):
                try:
                    count = int(first_text(obj, count_tag))
                except ValueError:
                    return None
    except NotFound:
        return None  # the listing decides
    return count


class Listing:
    """What is due, as it becomes known, gathered by a task of its own.

    ``refs`` grows in the order instances become due; ``error`` is what ended the
    search early, if anything (what was listed until then stays listed). Counted (with
    ``scopes``, the studies or series a `BulkFeed` reads): the bulk answers' instances
    are due as they come (`admit`), and once the engine says the bulk answers are over
    (`bulk_over`) the search runs only if they fell short of the count.
    """

    def __init__(self, upstream: Upstream, request: RetrieveRequest, scopes: Sequence[tuple[str, str | None]] = ()) -> None:
        self.refs: dict[str, InstanceRef] = {}
        self.done = False
        self.error: Exception | None = None
        self.expected: int | None = None  # counted: what the archive says the scopes hold
        self._bulk_over = asyncio.Event()
        self._changed = asyncio.Event()
        work = self._count(upstream, request, scopes) if scopes else self._search(upstream, request)
        self._task = asyncio.create_task(work)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _count(self, upstream: Upstream, request: RetrieveRequest, scopes: Sequence[tuple[str, str | None]]) -> None:
        """Count what the scopes hold, one search after the other (a patient's fifty
        studies are not fifty requests at once on the archive; the bulk answers are
        read meanwhile); after them, search only if they brought fewer (an archive
        that cannot count, or fails to, is searched)."""
        total = 0
        try:
            for study, series in scopes:
                count = await count_instances(upstream, study, series)
                if count is None:
                    break
                total += count
            else:
                self.expected = total
                self._notify()
        except Exception:  # noqa: BLE001 - whatever keeps the count unknown, the search decides
            pass
        await self._bulk_over.wait()
        if self.expected is not None and len(self.refs) >= self.expected:
            self.done = True
            self._notify()
            return
        await self._search(upstream, request)

    async def _search(self, upstream: Upstream, request: RetrieveRequest) -> None:
        try:
            async for ref in search_instances(upstream, request):
                self.refs.setdefault(ref.sop_instance_uid, ref)
                self._notify()
        except Exception as exc:  # noqa: BLE001 - kept for the caller, which makes it a status
            self.error = exc
        finally:
            self.done = True
            self._notify()

    def admit(self, ref: InstanceRef) -> None:
        """A bulk answer's instance is due (counted: whatever the bulk answers bring)."""
        self.refs.setdefault(ref.sop_instance_uid, ref)
        self._notify()

    def bulk_over(self) -> None:
        """The bulk answers have brought all they will (or the retrieval has ended)."""
        self._bulk_over.set()

    def unknown(self) -> int:
        """Instances due by the count that neither the bulk answers nor the search
        named, because the search failed (the archive went away mid-way): they fail,
        without a UID to list."""
        if self.done and self.error is not None and self.expected is not None:
            return max(0, self.expected - len(self.refs))
        return 0

    def total(self) -> int | None:
        """How many instances are due, once known: at the end of the search, or,
        counted, from the count while the bulk answers come (more if they bring more)."""
        if self.done:
            return len(self.refs) + self.unknown()
        if self.expected is not None and not self._bulk_over.is_set():
            return max(self.expected, len(self.refs))
        return None

    async def complete(self) -> None:
        """Wait until every due instance is known, however the search ends (counted:
        after `bulk_over`)."""
        while not self.done:
            await self._changed.wait()

    async def close(self) -> None:
        """Stop counting and searching (a cancelled or finished request)."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
