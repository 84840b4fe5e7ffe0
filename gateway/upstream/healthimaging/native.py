"""HealthImaging's native image-set API (botocore's ``medical-imaging`` client on the
``runtime-`` host): SearchImageSets, to continue a study search past the 10,000
results QIDO-RS lets a search reach and to find a study's image sets;
GetImageSetMetadata and GetImageFrame, from which the frames retrieve path
rebuilds instances (`frames`).

SearchImageSets pages with ``nextToken`` and no cap, but answers each image set with
a fixed set of study-level tags (`SUMMARY_TAGS`), and filters on at most two
attributes. So a search continues through it only when everything it matches on
and returns is among those tags (`continuable`); it sends ``isPrimary`` (DICOMweb
shows primary image sets only) and the most selective key it can express, and the
gateway matches the rest on each answer, as it does with QIDO-RS.

botocore's client is blocking: each call runs in a thread, spaced by the client-side
rate limit of SearchImageSets; botocore retries throttling itself.
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from gateway.config import UpstreamConfig
from gateway.model.query import Key
from gateway.model.search import Search
from gateway.upstream.base import JsonObject
from gateway.upstream.errors import (
    AnswerTooLarge,
    UpstreamAuthError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream.healthimaging.ratelimit import RateLimits
from gateway.upstream.healthimaging.signer import AwsCredentials
from gateway.upstream.http import MIB

# DICOMTags of an image set summary: (tag, VR, summary field).
SUMMARY_FIELDS: tuple[tuple[int, str, str], ...] = (
    (0x00100020, "LO", "DICOMPatientId"),
    (0x00100010, "PN", "DICOMPatientName"),
    (0x00100030, "DA", "DICOMPatientBirthDate"),
    (0x00100040, "CS", "DICOMPatientSex"),
    (0x0020000D, "UI", "DICOMStudyInstanceUID"),
    (0x00200010, "SH", "DICOMStudyId"),
    (0x00081030, "LO", "DICOMStudyDescription"),
    (0x00201206, "IS", "DICOMNumberOfStudyRelatedSeries"),
    (0x00201208, "IS", "DICOMNumberOfStudyRelatedInstances"),
    (0x00080050, "SH", "DICOMAccessionNumber"),
    (0x00080020, "DA", "DICOMStudyDate"),
    (0x00080030, "TM", "DICOMStudyTime"),
)
SUMMARY_TAGS = frozenset(tag for tag, _, _ in SUMMARY_FIELDS)
# Filled in by the C-FIND front itself, never by the archive.
_FRONT_TAGS = frozenset({0x00080005, 0x00080052, 0x00080054})
# Keys SearchImageSets can filter on with EQUAL (one value, no wildcard), most selective first.
_EQUAL_FILTERS = ((0x00100020, "DICOMPatientId"), (0x00080050, "DICOMAccessionNumber"), (0x00200010, "DICOMStudyId"))
STUDY_DATE = 0x00080020
AUTH_CODES = frozenset({
    "AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
    "ExpiredTokenException", "InvalidClientTokenId", "SignatureDoesNotMatch",
})


def continuable(search: Search) -> bool:
    """Can SearchImageSets answer this study search as QIDO-RS would?"""
    needed = set(search.include) | {k.tag for k in search.keys}
    return needed - _FRONT_TAGS <= SUMMARY_TAGS and all(k.vr != "SQ" for k in search.keys)


def _plain(key: Key) -> str | None:
    """The key's single value when it has no wildcard, else None."""
    if len(key.values) != 1 or key.has_wildcard:
        return None
    return key.values[0]


def _date_filter(key: Key) -> dict[str, Any] | None:
    """StudyDate ``A-B``, ``A-``, ``-B`` or ``A`` as a BETWEEN on DICOMStudyDateAndTime."""
    if len(key.values) != 1:
        return None
    low, dash, high = key.values[0].partition("-")
    if not dash:
        high = low
    low, high = low or "00010101", high or "99991231"
    if not (low.isdigit() and high.isdigit() and len(low) == len(high) == 8):
        return None
    return {
        "operator": "BETWEEN",
        "values": [
            {"DICOMStudyDateAndTime": {"DICOMStudyDate": low, "DICOMStudyTime": "000000"}},
            {"DICOMStudyDateAndTime": {"DICOMStudyDate": high, "DICOMStudyTime": "235959.999999"}},
        ],
    }


def criteria(search: Search) -> dict[str, Any]:
    """Search criteria: primary image sets, narrowed by one key where one fits."""
    filters: list[dict[str, Any]] = [{"operator": "EQUAL", "values": [{"isPrimary": True}]}]
    keys = {k.tag: k for k in search.keys if not k.universal}
    narrowing = next(
        ({"operator": "EQUAL", "values": [{name: value}]} for tag, name in _EQUAL_FILTERS if tag in keys and (value := _plain(keys[tag]))),
        None,
    )
    if narrowing is None and STUDY_DATE in keys:
        narrowing = _date_filter(keys[STUDY_DATE])
    if narrowing is not None:
        filters.append(narrowing)
    return {"filters": filters}


def study_object(summary: dict[str, Any]) -> JsonObject:
    """An image set summary as the DICOM JSON of a QIDO-RS study result."""
    tags = summary.get("DICOMTags") or {}
    obj: dict[str, Any] = {}
    for tag, vr, name in SUMMARY_FIELDS:
        value = tags.get(name)
        if value in (None, ""):
            continue
        obj[f"{tag:08X}"] = {"vr": vr, "Value": [{"Alphabetic": str(value)} if vr == "PN" else value if vr == "IS" else str(value)]}
    return obj


class NativeClient:
    """SearchImageSets on one data store."""

    def __init__(self, cfg: UpstreamConfig, credentials: AwsCredentials, limits: RateLimits) -> None:
        self.cfg = cfg
        self.credentials = credentials
        self.limits = limits
        self.max_answer = cfg.max_answer_mb * MIB
        self._client: Any = None

    def _make_client(self) -> Any:
        # An explicit endpoint already names the runtime host: botocore must not prefix it again.
        config = Config(
            inject_host_prefix=False,
            connect_timeout=self.cfg.connect_timeout,
            read_timeout=self.cfg.timeout,
            retries={"mode": "standard"},
        )
        return self.credentials.session.create_client(
            "medical-imaging", region_name=self.cfg.region, endpoint_url=self.cfg.runtime_endpoint_url,
            verify=self.cfg.verify_tls, config=config,
        )

    async def _call(self, operation: str, blob: str = "", **params: Any) -> dict[str, Any]:
        """One call in a thread; a streaming member ``blob`` of the answer is read there too."""
        await self.limits.acquire(operation)
        try:
            if self._client is None:
                self._client = await asyncio.to_thread(self._make_client)
            method = getattr(self._client, _snake(operation))

            def invoke() -> dict[str, Any]:
                answer: dict[str, Any] = method(**params)
                if blob:
                    stream = answer[blob]
                    try:
                        answer[blob] = stream.read(self.max_answer + 1)
                    finally:
                        stream.close()
                    if len(answer[blob]) > self.max_answer:
                        raise AnswerTooLarge(operation, self.max_answer)
                return answer

            return await asyncio.to_thread(invoke)
        except NoCredentialsError:
            raise UpstreamAuthError("no AWS credentials for the HealthImaging native API") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in AUTH_CODES or status in (401, 403):
                raise UpstreamAuthError(f"HealthImaging refused {operation}: {code} (HTTP {status})", status) from None
            if status == 429 or status >= 500:
                raise UpstreamUnavailable(f"HealthImaging {operation} failed: {code} (HTTP {status})", status=status) from None
            raise UpstreamRejected(f"HealthImaging rejected {operation}: {code} (HTTP {status})", status) from None
        except BotoCoreError as exc:
            raise UpstreamUnavailable(f"HealthImaging {operation} failed: {type(exc).__name__}") from None

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
            self._client = None

    async def search_image_sets(self, search: Search) -> AsyncIterator[dict[str, Any]]:
        """Every image set summary the search's criteria select, page by page."""
        params: dict[str, Any] = {"datastoreId": self.cfg.datastore_id, "searchCriteria": criteria(search)}
        while True:
            page = await self._call("SearchImageSets", **params)
            for summary in page.get("imageSetsMetadataSummaries") or []:
                yield summary
            token = page.get("nextToken")
            if not token:
                return
            params["nextToken"] = token


    async def image_sets_of_study(self, study_uid: str, primary: bool) -> list[dict[str, Any]]:
        """The summaries of a study's primary image set (``primary``) or non-primary ones."""
        filters = [
            {"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": study_uid}]},
            {"operator": "EQUAL", "values": [{"isPrimary": primary}]},
        ]
        params: dict[str, Any] = {"datastoreId": self.cfg.datastore_id, "searchCriteria": {"filters": filters}}
        found: list[dict[str, Any]] = []
        while True:
            page = await self._call("SearchImageSets", **params)
            found += page.get("imageSetsMetadataSummaries") or []
            token = page.get("nextToken")
            if not token:
                return found
            params["nextToken"] = token

    async def image_set_metadata(self, image_set_id: str) -> dict[str, Any]:
        """GetImageSetMetadata's document, decompressed (botocore hands the gzip on as is)."""
        answer = await self._call(
            "GetImageSetMetadata", blob="imageSetMetadataBlob", datastoreId=self.cfg.datastore_id, imageSetId=image_set_id
        )
        raw: bytes = answer["imageSetMetadataBlob"]
        try:
            if answer.get("contentEncoding") == "gzip" or raw[:2] == b"\x1f\x8b":
                raw = _gunzip(raw, self.max_answer)
            document = json.loads(raw)
        except (OSError, EOFError, ValueError, RecursionError, zlib.error):
            raise UpstreamRejected(f"HealthImaging answered unreadable metadata for image set {image_set_id}") from None
        if not isinstance(document, dict):
            raise UpstreamRejected(f"HealthImaging answered metadata for image set {image_set_id} that is not an object")
        return document

    async def image_frame(self, image_set_id: str, frame_id: str) -> bytes:
        """GetImageFrame: one frame as stored (HTJ2K for lossless data by default)."""
        answer = await self._call(
            "GetImageFrame", blob="imageFrameBlob", datastoreId=self.cfg.datastore_id, imageSetId=image_set_id,
            imageFrameInformation={"imageFrameId": frame_id},
        )
        return answer["imageFrameBlob"]  # type: ignore[no-any-return]


def _gunzip(data: bytes, limit: int) -> bytes:
    """``data`` decompressed, refused past ``limit`` bytes: a few MB of gzip can
    inflate to GBs."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    raw = inflater.decompress(data, limit + 1)
    if len(raw) > limit:
        raise AnswerTooLarge("GetImageSetMetadata", limit)
    if not inflater.eof:
        raise EOFError("gzip data ends early")
    return raw


def _snake(operation: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in operation).lstrip("_")


def skipping(objects: Iterable[JsonObject], seen: set[str]) -> list[JsonObject]:
    """The study objects whose Study Instance UID is not in ``seen`` (adding them)."""
    fresh = []
    for obj in objects:
        uid = ((obj.get("0020000D") or {}).get("Value") or [""])[0]
        if uid and uid not in seen:
            seen.add(uid)
            fresh.append(obj)
    return fresh
