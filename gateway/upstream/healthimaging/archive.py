"""AWS HealthImaging as an upstream: its DICOMweb representation, SigV4-signed.

A DICOMweb archive at ``{dicomweb_endpoint_url}/datastore/{datastore_id}`` with what
the developer guide documents and nothing more:

* STOW-RS ``POST /studies/{study}`` of at most 1 GB per request: a larger batch is
  sent in several, an instance alone above it is refused. A 401/403 holds delivery
  (the reason names credentials or the clock, from ``x-amzn-ErrorType`` and the
  answer's Date); 429 and 5xx are retried by the forwarder;
* QIDO-RS with the match keys each resource documents (the others are matched by the
  gateway alone, as every answer is), ``limit`` at most 1000 and at most 10,000
  results reachable per search (beyond: SearchTruncated);
* WADO-RS of single instances (``application/dicom; transfer-syntax=...``), instance
  and series metadata, frames; no study-level or series-level retrieval, so fronts
  fetch instance by instance (`Capabilities`); no DELETE;
* reads of each operation spaced by a client-side token bucket at the service's
  quotas (``[upstream.rate_limits]``); a read throttled all the same (429: other
  clients share the account's quota) or failing transiently is tried again, a
  bounded number of times with growing pauses, at least its Retry-After;
* a study search past QIDO-RS's 10,000 results goes on through the native
  SearchImageSets where the image set summaries can answer it (`native`);
* with ``include_non_primary``, the instances of a study's non-primary image sets
  (which QIDO-RS and WADO-RS without ``imageSetId`` do not show) are found through
  SearchImageSets and their metadata, answered in series and instance searches of the
  study and retrieved with their ``imageSetId``;
* an instance, series or frames read with an ``image_set_id`` (a facade client's
  ``imageSetId``) come from that image set, named to the service as ``imageSetId``;
  its metadata is read by ID, never searched for;
* with ``retrieve_path = "frames"``, instances with pixel data are rebuilt from their
  image set's metadata and frames (`frames`) rather than read with GetDICOMInstance.
"""

from __future__ import annotations

import asyncio
import calendar
import functools
import logging
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, replace
from email.utils import parsedate_tz
from typing import Any, TypeVar

import aiohttp
from pydicom.datadict import tag_for_keyword

from gateway.config import UpstreamConfig
from gateway.dicomweb import mediatypes
from gateway.dicomweb.multipart import FileMultipart
from gateway.dicomweb.qido import QidoOptions
from gateway.metrics import Metrics
from gateway.model.search import Search
from gateway.spill import SpillArea
from gateway.upstream.base import (
    Capabilities,
    Frame,
    Health,
    JsonObject,
    Retrieved,
    StoreItem,
    StoreOutcome,
)
from gateway.upstream.dicomweb import DicomWebUpstream
from gateway.upstream.errors import (
    NotFound,
    SearchTruncated,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream.healthimaging.frames import (
    TtlCache,
    Unrebuildable,
    frames_size,
    instance_entry,
    rebuild,
    search_objects,
)
from gateway.upstream.healthimaging.native import (
    NativeClient,
    continuable,
    skipping,
    study_object,
)
from gateway.upstream.healthimaging.ratelimit import RateLimits
from gateway.upstream.healthimaging.signer import (
    AwsCredentials,
    SigV4Signer,
    canonical_query,
)
from gateway.upstream.http import EVERY_STATUS, Body, http_status, read_error_body

log = logging.getLogger("gateway.upstream")
T = TypeVar("T")

CAPABILITIES = Capabilities(
    study_retrieve=False,
    series_retrieve=False,
    frames=True,
    metadata=True,
    delete=False,
    search_limit=10_000,
    max_page=1000,
)
MAX_STOW_BYTES = 1_000_000_000  # "up to 1GB of DICOM data per request"
_PART_OVERHEAD = 128  # part headers and delimiters of the multipart body, per instance
MAX_INCLUDEFIELDS = 50
SKEW_SECONDS = 300  # SigV4 refuses requests more than five minutes off the service's clock
READ_ATTEMPTS = 6  # tries of one read (instance, metadata) before its error is final
READ_BACKOFF_BASE = 0.2  # seconds before the second try, doubled for each next one
READ_BACKOFF_MAX = 5.0
METADATA_TTL = 30.0  # seconds an image set's metadata serves the frames path
METADATA_CACHED = 8  # image sets whose metadata is kept at once
RETRY_AFTER_MAX = 30.0  # a longer Retry-After is waited this long: a move must not stall for hours


def _tags(*keywords: str) -> frozenset[int]:
    return frozenset(int(tag_for_keyword(k)) for k in keywords)  # type: ignore[arg-type]


# The match keys each QIDO-RS resource documents ("Searching DICOM data in HealthImaging").
STUDY_KEYS = _tags(
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
    "StudyDescription", "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime",
    "StudyInstanceUID", "StudyID",
)
SERIES_KEYS = _tags("Modality", "SeriesInstanceUID")
INSTANCE_KEYS = _tags("SOPClassUID", "SOPInstanceUID")
ALL_SERIES_KEYS = STUDY_KEYS | _tags(
    "Modality", "SeriesInstanceUID", "SeriesNumber", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"
)
ALL_INSTANCE_KEYS = ALL_SERIES_KEYS | INSTANCE_KEYS

# What an authentication refusal says, by x-amzn-ErrorType.
AUTH_REFUSALS = {
    "InvalidSignatureException": "HealthImaging refused the request signature (InvalidSignatureException): check the secret access key and the system clock",
    "SignatureDoesNotMatch": "HealthImaging refused the request signature (SignatureDoesNotMatch): check the secret access key",
    "UnrecognizedClientException": "HealthImaging does not know the access key or session token (UnrecognizedClientException): check the AWS credentials",
    "InvalidClientTokenId": "HealthImaging does not know the access key (InvalidClientTokenId): check the AWS credentials",
    "ExpiredTokenException": "the AWS session token has expired (ExpiredTokenException): check that the credential source renews it",
    "AccessDeniedException": "the AWS credentials lack a permission (AccessDeniedException): check the IAM policy (medical-imaging:StoreDICOM, Search*, Get*)",
    "MissingAuthenticationTokenException": "HealthImaging found no signature (MissingAuthenticationTokenException): check upstream.dicomweb_endpoint_url",
}


def error_type(headers: Mapping[str, str]) -> str:
    """AWS's error code from ``x-amzn-ErrorType`` (``Code`` or ``Code:namespace-URL``)."""
    return headers.get("x-amzn-ErrorType", "").split(":", 1)[0].strip()


def clock_skew(headers: Mapping[str, str]) -> float | None:
    """How far our clock is from the service's (its Date header), when past SigV4's
    five minutes; None when within them or unknown."""
    parsed = parsedate_tz(headers.get("Date", ""))
    if parsed is None:
        return None
    theirs = calendar.timegm(parsed[:9]) - (parsed[9] or 0)
    skew = time.time() - theirs
    return skew if abs(skew) > SKEW_SECONDS else None


async def read_with_retry(operation: str, read: Callable[[], Awaitable[T]]) -> T:
    """``read()`` tried up to READ_ATTEMPTS times while it fails transiently (429,
    5xx, connection errors: `UpstreamUnavailable`), pausing between tries a growing,
    jittered backoff, or the answer's Retry-After when that is longer. The client-side
    buckets keep the gateway's own traffic under the quotas; these retries absorb the
    throttling that other clients sharing the account's quota cause."""
    for attempt in range(1, READ_ATTEMPTS):
        try:
            return await read()
        except UpstreamUnavailable as exc:
            backoff = min(READ_BACKOFF_MAX, READ_BACKOFF_BASE * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            delay = max(backoff, min(exc.retry_after or 0.0, RETRY_AFTER_MAX))
            log.info("HealthImaging %s failed transiently (%s); try %d of %d in %.1f s", operation, exc, attempt + 1, READ_ATTEMPTS, delay)
            await asyncio.sleep(delay)
    return await read()


def _allowed_keys(path: str) -> frozenset[int]:
    """The documented match keys of the QIDO-RS resource ``path``."""
    parts = path.split("/")
    if parts == ["studies"]:
        return STUDY_KEYS
    if parts == ["series"]:
        return ALL_SERIES_KEYS
    if len(parts) == 3 and parts[2] == "series":
        return SERIES_KEYS
    if len(parts) == 5:
        return INSTANCE_KEYS
    return ALL_INSTANCE_KEYS  # a study's instances, or all instances


@dataclass(frozen=True)
class Located:
    """Where an instance is: its image set, whether primary, its metadata and entry."""

    image_set_id: str
    primary: bool
    document: dict[str, Any]
    entry: dict[str, Any]


def _batches(instances: Sequence[StoreItem]) -> list[list[StoreItem]]:
    """Consecutive runs of instances whose multipart body stays within the STOW limit."""
    batches: list[list[StoreItem]] = []
    size = 0
    for item in instances:
        cost = item.size + _PART_OVERHEAD
        if not batches or size + cost > MAX_STOW_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(item)
        size += cost
    return batches


class HealthImagingUpstream(DicomWebUpstream):
    """One HealthImaging data store over its DICOMweb representation.

    ``session`` and ``credentials`` replace those built from the config (tests).
    """

    kind = "healthimaging"

    def __init__(
        self,
        cfg: UpstreamConfig,
        qido: QidoOptions = QidoOptions(),
        *,
        session: aiohttp.ClientSession | None = None,
        credentials: AwsCredentials | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.region = cfg.region
        self.datastore_id = cfg.datastore_id
        credentials = credentials or AwsCredentials(cfg.profile)
        base = f"{cfg.dicomweb_endpoint_url}/datastore/{cfg.datastore_id}"
        super().__init__(
            replace(cfg, url=base), qido, session=session, signer=SigV4Signer(cfg.region, credentials),
            capabilities=CAPABILITIES, metrics=metrics,
        )
        self.limits = RateLimits(cfg.rate_limits)
        self.native = NativeClient(cfg, credentials, self.limits)
        self.retrieve_path = cfg.retrieve_path
        self.include_non_primary = cfg.include_non_primary
        # study UID -> (image set ID, metadata) of its primary, and of its non-primary image sets
        self._metadata: TtlCache[str, list[tuple[str, dict[str, Any]]]] = TtlCache(
            self._primary_metadata, METADATA_TTL, METADATA_CACHED
        )
        self._non_primary: TtlCache[str, list[tuple[str, dict[str, Any]]]] = TtlCache(
            self._non_primary_metadata, METADATA_TTL, METADATA_CACHED
        )
        # image set ID -> its metadata, for reads that name their image set
        self._named: TtlCache[str, dict[str, Any]] = TtlCache(self._named_metadata, METADATA_TTL, METADATA_CACHED)

    async def close(self) -> None:
        await super().close()
        await self.native.close()

    # -- store -------------------------------------------------------------------------

    async def store_instances(self, study_uid: str, instances: Sequence[StoreItem]) -> list[StoreOutcome]:
        outcomes: list[StoreOutcome] = []
        for batch in _batches(instances):
            if len(batch) == 1 and batch[0].size + _PART_OVERHEAD > MAX_STOW_BYTES:
                outcomes.append(StoreOutcome("rejected", f"instance of {batch[0].size} bytes is above HealthImaging's 1 GB STOW-RS limit"))
                continue
            outcomes += await super().store_instances(study_uid, batch)
        delivered = {item.sop_instance_uid for item, o in zip(instances, outcomes) if o.kind == "delivered"}
        if self.include_non_primary or not delivered:
            return outcomes
        apart = await self._not_primary(study_uid, delivered)
        return [
            replace(o, not_primary=True) if o.kind == "delivered" and item.sop_instance_uid in apart else o
            for item, o in zip(instances, outcomes)
        ]

    async def _not_primary(self, study_uid: str, delivered: set[str]) -> set[str]:
        """Which of the delivered instances went to a non-primary image set. The STOW-RS
        answer does not say (the guide documents none of its fields for that), so the
        study's non-primary image sets are searched (SearchImageSets, ``isPrimary``
        false) and their metadata read. A failure only loses the count: delivery is done."""
        self._non_primary.forget(study_uid)
        try:
            image_sets = await self._non_primary.get(study_uid)
        except UpstreamError as exc:
            log.warning("could not check whether instances of study %s went to a non-primary image set: %s", study_uid, exc)
            return set()
        apart = {
            sop
            for _, document in image_sets
            for series in ((document.get("Study") or {}).get("Series") or {}).values()
            for sop in (series.get("Instances") or {})
            if sop in delivered
        }
        if apart:
            log.warning(
                "%d instance(s) of study %s were stored in a non-primary HealthImaging image set (their patient or"
                " study attributes conflict with the study's); searches and retrievals do not show them unless"
                " upstream.include_non_primary = true", len(apart), study_uid,
            )
        return apart

    async def _stow_body(self, body: FileMultipart) -> Body:
        """SigV4 signs the payload hash: the body is read once to hash it, then sent."""
        try:
            return Body(body.content_length, await asyncio.to_thread(body.sha256))
        except OSError as exc:
            raise UpstreamUnavailable(f"local file error: {exc.strerror or exc}") from None

    def _config_refusal(self, status: int, headers: Mapping[str, str]) -> str:
        code = error_type(headers)
        if status == 404:
            if code == "ResourceNotFoundException":
                return f"HealthImaging has no data store {self.datastore_id} in {self.region} (HTTP 404); check upstream.datastore_id and upstream.region"
            return f"no HealthImaging STOW-RS service at {self.url} ({http_status(status)}); check upstream.dicomweb_endpoint_url"
        if status == 405:
            return f"no HealthImaging STOW-RS service at {self.url} ({http_status(status)}); check upstream.dicomweb_endpoint_url"
        reason = AUTH_REFUSALS.get(code, f"HealthImaging refused our credentials ({http_status(status)} {code}): check the AWS credentials")
        skew = clock_skew(headers)
        if skew is not None:
            direction = "behind" if skew < 0 else "ahead of"
            reason = f"the system clock is {abs(skew):.0f} s {direction} HealthImaging's, beyond SigV4's 5 minutes: fix the clock (NTP); {reason}"
        return reason

    # -- search ------------------------------------------------------------------------

    def _search_query(self, path: str, search: Search, limit: int, offset: int) -> str:
        """Only documented keys are sent (the gateway matches the others itself), at most
        50 includefields (more: ``all``), in SigV4 canonical form."""
        allowed = _allowed_keys(path)
        keys = tuple(k for k in search.keys if k.tag in allowed)
        include = search.include if len(search.include) <= MAX_INCLUDEFIELDS else ()
        query = super()._search_query(path, replace(search, keys=keys, include=include), limit, offset)
        if include is not search.include:
            query += "&includefield=all"
        return canonical_query(query)

    def search_for_studies(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        """QIDO-RS, continued through SearchImageSets past the 10,000 results a QIDO-RS
        search can reach when the search needs only what image set summaries hold
        (`native.continuable`); otherwise such a search still ends in SearchTruncated."""
        return self._studies(search)

    async def _studies(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        seen: set[str] = set()
        try:
            async for obj in super().search_for_studies(search):
                seen.update(((obj.get("0020000D") or {}).get("Value") or [])[:1])
                yield obj
        except SearchTruncated as exc:
            if not continuable(search):
                raise
            log.info("QIDO-RS stopped at %d studies; continuing the search with SearchImageSets", exc.returned)
            async for summary in self.native.search_image_sets(search):
                for obj in skipping([study_object(summary)], seen):
                    yield obj

    def search_for_series(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._with_non_primary(super().search_for_series(search), search, instances=False)

    def search_for_instances(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._with_non_primary(super().search_for_instances(search), search, instances=True)

    async def _with_non_primary(
        self, answers: AsyncIterator[JsonObject], search: Search, *, instances: bool
    ) -> AsyncGenerator[JsonObject, None]:
        """QIDO-RS's answers (primary image sets only), then, with ``include_non_primary``
        and a study named, the series or instances of the study's non-primary image
        sets that QIDO-RS did not show, from their metadata (read anew for each search).
        The front matches every answer against the search's keys."""
        uid_tag = "00080018" if instances else "0020000E"
        seen: set[str] = set()
        async for obj in answers:
            seen.update(((obj.get(uid_tag) or {}).get("Value") or [])[:1])
            yield obj
        if not (self.include_non_primary and search.study_uid):
            return
        self._non_primary.forget(search.study_uid)
        for image_set_id, document in await self._non_primary.get(search.study_uid):
            for obj in search_objects(document, search.series_uid, instances=instances):
                uid = ((obj.get(uid_tag) or {}).get("Value") or [""])[0]
                if uid and uid not in seen:
                    seen.add(uid)
                    yield obj

    # -- retrieve ----------------------------------------------------------------------

    def _image_set_query(self, image_set_id: str | None) -> str:
        return canonical_query(f"imageSetId={image_set_id}") if image_set_id else ""

    def _instance_accepts(self, acceptable: Sequence[str]) -> list[tuple[str, int | None]]:
        """GetDICOMInstance answers one Part 10 file: ``application/dicom`` with the
        syntax (``*``: as stored), not multipart."""
        return [(f"{mediatypes.DICOM}; transfer-syntax={syntax}", None) for syntax in acceptable]

    async def retrieve_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        spill_area: SpillArea,
        spill_bytes: int,
        *,
        acceptable: Sequence[str],
        image_set_id: str | None = None,
    ) -> Retrieved:
        """Rebuilt from metadata and frames (``retrieve_path = "frames"``) where it has
        frames, its stored syntax is acceptable and its frames fit in ``spill_bytes``,
        else GetDICOMInstance; an instance of a non-primary image set
        (``include_non_primary``) is found in its image set and read from there; one
        in a named image set (``image_set_id``) is read from that one."""
        located: Located | None = None
        if image_set_id and self.retrieve_path == "frames":
            located = await self._locate_in(image_set_id, study_uid, series_uid, sop_instance_uid)
        elif self.retrieve_path == "frames" or self.include_non_primary:
            located = await self._locate(study_uid, series_uid, sop_instance_uid)
        stored = str(located.entry.get("StoredTransferSyntaxUID") or "") if located is not None else ""
        # Rebuilt in memory: an instance larger than the spill threshold is read with
        # GetDICOMInstance, whose answer is spilled to disk as it arrives.
        size = frames_size(located.entry) if located is not None else 0
        rebuildable = ("*" in acceptable or stored in acceptable) and size <= spill_bytes
        if located is not None and self.retrieve_path == "frames" and rebuildable and located.entry.get("ImageFrames"):
            rebuilt = await self._rebuilt(located, series_uid, sop_instance_uid)
            if rebuilt is not None:
                return rebuilt
        if not image_set_id and located is not None and not located.primary:
            image_set_id = located.image_set_id
        query = self._image_set_query(image_set_id)
        url = self.http.url(f"studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}", query)

        async def read() -> Retrieved:
            await self.limits.acquire("GetDICOMInstance")
            for accept, _ in self._instance_accepts(acceptable):
                found = await self._wado(url, accept, spill_area, spill_bytes)
                if found is not None:
                    return found
            raise UpstreamRejected("HealthImaging offers the instance in no representation we accept", 406)

        return await read_with_retry("GetDICOMInstance", read)

    async def _primary_metadata(self, study_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """The ID and metadata document of the study's primary image set (none or one)."""
        return await self._image_sets(study_uid, primary=True)

    async def _non_primary_metadata(self, study_uid: str) -> list[tuple[str, dict[str, Any]]]:
        """The IDs and metadata documents of the study's non-primary image sets."""
        return await self._image_sets(study_uid, primary=False)

    async def _named_metadata(self, image_set_id: str) -> dict[str, Any]:
        """The metadata document of the image set ``image_set_id``; NotFound when the
        data store has no such image set."""
        try:
            return await read_with_retry("GetImageSetMetadata", functools.partial(self.native.image_set_metadata, image_set_id))
        except UpstreamRejected as exc:
            if exc.status in (400, 404):  # ValidationException for a malformed ID, ResourceNotFound for an unknown one
                raise NotFound(f"no image set {image_set_id} in data store {self.datastore_id}") from None
            raise

    async def _locate_in(self, image_set_id: str, study_uid: str, series_uid: str, sop_instance_uid: str) -> Located:
        """The instance in the image set named by its ID (no search); NotFound when the
        image set or the instance in it is not there."""
        document = await self._named.get(image_set_id)
        study = ((document.get("Study") or {}).get("DICOM") or {}).get("StudyInstanceUID")
        entry = instance_entry(document, series_uid, sop_instance_uid) if study in (None, study_uid) else None
        if entry is None:
            raise NotFound(f"instance not in image set {image_set_id}")
        return Located(image_set_id, False, document, entry)

    async def _image_sets(self, study_uid: str, primary: bool) -> list[tuple[str, dict[str, Any]]]:
        summaries = await read_with_retry("SearchImageSets", lambda: self.native.image_sets_of_study(study_uid, primary))
        found = []
        for summary in summaries:
            image_set_id = str(summary.get("imageSetId") or "")
            document = await read_with_retry("GetImageSetMetadata", functools.partial(self.native.image_set_metadata, image_set_id))
            found.append((image_set_id, document))
        return found

    async def _locate(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Located | None:
        """The image set holding the instance and its metadata: the study's primary one,
        else (``include_non_primary``) a non-primary one; each read anew once when the
        cached copy lacks the instance (stored since, perhaps). None when neither has it."""
        caches = [(self._metadata, True)] + ([(self._non_primary, False)] if self.include_non_primary else [])
        for cache, primary in caches:
            for fresh in (False, True):
                if fresh:
                    cache.forget(study_uid)
                for image_set_id, document in await cache.get(study_uid):
                    entry = instance_entry(document, series_uid, sop_instance_uid)
                    if entry is not None:
                        return Located(image_set_id, primary, document, entry)
        return None

    async def _rebuilt(self, located: Located, series_uid: str, sop_instance_uid: str) -> Retrieved | None:
        """The instance rebuilt from metadata and frames; None when the metadata does
        not make a data set (then GetDICOMInstance reads it)."""

        async def frame(frame_id: str) -> bytes:
            return await read_with_retry("GetImageFrame", lambda: self.native.image_frame(located.image_set_id, frame_id))

        frames = await asyncio.gather(*(frame(str(f.get("ID") or "")) for f in located.entry["ImageFrames"]))
        try:
            data, syntax = await asyncio.to_thread(rebuild, located.document, series_uid, sop_instance_uid, frames)
        except Unrebuildable as exc:
            log.warning("instance %s not rebuilt from HealthImaging metadata (%s); reading it with GetDICOMInstance", sop_instance_uid, exc)
            return None
        return Retrieved(data, None, 0, len(data), transfer_syntax=syntax)

    async def retrieve_metadata(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        image_set_id: str | None = None,
    ) -> list[JsonObject]:
        """Instance and series metadata as the service serves them; a study's, which it
        does not serve, series by series (those of the named image set's metadata when
        ``image_set_id`` is given, else those a series search finds)."""
        if series_uid is None:
            if image_set_id:
                document = await self._named.get(image_set_id)
                series_uids = [str(uid) for uid in ((document.get("Study") or {}).get("Series") or {})]
            else:
                series_uids = []
                async for series in self.search_for_series(Search(study_uid=study_uid, include=(0x0020000E,))):
                    series_uids += [str(uid) for uid in ((series.get("0020000E") or {}).get("Value") or [])[:1]]
            objects: list[JsonObject] = []
            for uid in series_uids:
                objects += await self.retrieve_metadata(study_uid, uid, image_set_id=image_set_id)
            return objects
        operation = "GetDICOMSeriesMetadata" if sop_instance_uid is None else "GetDICOMInstanceMetadata"

        async def read() -> list[JsonObject]:
            await self.limits.acquire(operation)
            return await DicomWebUpstream.retrieve_metadata(self, study_uid, series_uid, sop_instance_uid, image_set_id=image_set_id)

        return await read_with_retry(operation, read)

    async def retrieve_frames(
        self,
        study_uid: str,
        series_uid: str,
        sop_instance_uid: str,
        frame_numbers: Sequence[int],
        *,
        acceptable: Sequence[str],
        image_set_id: str | None = None,
    ) -> AsyncGenerator[Frame, None]:
        await self.limits.acquire("GetDICOMInstanceFrames")
        async for frame in super().retrieve_frames(
            study_uid, series_uid, sop_instance_uid, frame_numbers, acceptable=acceptable, image_set_id=image_set_id
        ):
            yield frame

    # -- health ------------------------------------------------------------------------

    async def health(self) -> Health:
        """A signed one-result study search: ``auth refused``, ``throttled`` or
        ``unreachable`` say which of the three is wrong."""
        try:
            async with self.http.request(
                "GET", self.http.url("studies", "limit=1"), what="health probe",
                headers={"Accept": mediatypes.DICOM_JSON}, timeout=aiohttp.ClientTimeout(total=5),
                passthrough=EVERY_STATUS,
            ) as resp:
                await read_error_body(resp)
                status, headers = resp.status, resp.headers.copy()
        except UpstreamAuthError as exc:
            return Health(False, f"auth refused: {exc}")
        except UpstreamError as exc:
            return Health(False, f"unreachable: {exc}")
        if status in (401, 403):
            return Health(False, f"auth refused: {self._config_refusal(status, headers)}")
        if status == 429:
            return Health(True, f"throttled: {http_status(status)} {error_type(headers)}")
        if status >= 500:
            return Health(False, f"unreachable: {http_status(status)}")
        if status >= 400:
            return Health(False, f"refused: {self._config_refusal(status, headers) if status in (404, 405) else http_status(status)}")
        return Health(True, f"HTTP {status}")
