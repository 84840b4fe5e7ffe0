"""A generic DICOMweb archive (Orthanc, dcm4chee, Azure, Google) reached over HTTP(S)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import aiohttp
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.dicomweb import mediatypes
from gateway.logfmt import PATIENT_DATA
from gateway.metrics import Metrics
from gateway.spill import SpillArea
from gateway.upstream.auth import config_signer
from gateway.dicomweb.multipart import FileMultipart
from gateway.dicomweb.multipart_reader import MultipartError, boundary_of, iter_parts, single_part_in_file, split_parts
from gateway.model.json import first_text
from gateway.model.search import Search
from gateway.part10 import META_HEAD, PREAMBLE, read_file_meta
from gateway.dicomweb.qido import QidoOptions, query_string, resource_path, split_long_lists
from gateway.dicomweb.stow import ALREADY_STORED, TRANSIENT, parse_stow_response
from gateway.upstream.base import Capabilities, Frame, Health, JsonObject, Retrieved, StoreItem, StoreOutcome
from gateway.upstream.errors import (
    AnswerTooLarge,
    NotFound,
    NotSupported,
    SearchTruncated,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)
from gateway.upstream.http import (
    EVERY_STATUS,
    RETRYABLE_HTTP,
    Body,
    MIB,
    HttpClient,
    Signer,
    read_at_most,
    read_error_body,
    retry_after_seconds,
)
from gateway.upstream.http import http_status, short as _short

__all__ = ["FIRST_PAGE", "DicomWebUpstream", "retry_after_seconds"]

log = logging.getLogger("gateway.upstream")

EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
# Whole-request refusals that say the gateway's credentials (401, 403) or URL (404,
# 405: nothing, or no STOW-RS service, there) are wrong, or the archive's own set-up
# (424: Azure's DICOM service cannot reach its data lake or key vault). They do not
# depend on the instances sent, so they hold delivery instead of making instances dead.
CONFIG_REFUSALS = {
    401: "archive refused our credentials (HTTP 401); check upstream.auth",
    403: "archive denied us access (HTTP 403); check upstream.auth and the archive's permissions",
    404: "no STOW-RS service at the upstream URL (HTTP 404); check upstream.url",
    405: "no STOW-RS service at the upstream URL (HTTP 405); check upstream.url",
    424: "archive cannot reach a resource it depends on (HTTP 424 Failed Dependency: its storage or key vault)",
}


def _more_results_warning(resp: aiohttp.ClientResponse) -> bool:
    """PS3.18 10.6.3.3: a Warning header saying the server cut the page short."""
    return any("additional results" in w.lower() for w in resp.headers.getall("Warning", []))


async def _cancel_all(pages: collections.deque[tuple[int, int, asyncio.Future[tuple[list[JsonObject], bool, int]]]]) -> None:
    """Drop the QIDO-RS pages asked ahead: cancel those in flight and wait for each to
    end (what they answered or raised is no longer wanted)."""
    while pages:
        _, _, page = pages.popleft()
        page.cancel()
        with contextlib.suppress(asyncio.CancelledError, UpstreamError):
            await page


# Results in the first QIDO-RS page of a search; each later page asks twice as many
# as the one before, up to find.page_size.
FIRST_PAGE = 100
# Pages asked at once past the one being answered, once a search has proved longer
# than its first page.
PAGES_AHEAD = 2
# The attribute that identifies a result of each QIDO-RS resource.
LEVEL_UID_TAGS = {"studies": 0x0020000D, "series": 0x0020000E, "instances": 0x00080018}

# Accept headers for RetrieveInstance in the stored syntax, best first: the stored
# syntax (no transcoding by the archive, no size blow-up), then whatever the archive
# prefers to send.
WADO_ACCEPTS = (
    mediatypes.multipart_accept(mediatypes.DICOM, "*"),
    mediatypes.multipart_accept(mediatypes.DICOM),
)
# The same for RetrieveFrames (PS3.18 8.7.3.5.2: octet-stream with ``*`` takes any).
FRAME_ACCEPTS = (
    mediatypes.multipart_accept(mediatypes.OCTET_STREAM, "*"),
    mediatypes.multipart_accept(mediatypes.OCTET_STREAM),
)
# Statuses that mean "not in that representation": try the next Accept.
NOT_ACCEPTABLE = frozenset({400, 406, 415})
# For frames 400 means a bad frame number (Orthanc), so only these move on.
FRAMES_NOT_ACCEPTABLE = frozenset({406, 415})
# A DICOMweb archive without a DELETE answers these.
DELETE_NOT_SUPPORTED = frozenset({405, 501})
SPILL_CHUNK = 1 << 20


class DicomWebUpstream:
    """STOW-RS, QIDO-RS, WADO-RS and DELETE against one base URL.

    ``session`` and ``signer`` replace the ones built from the config (tests and the
    facade pass their own); ``capabilities`` those of a generic DICOMweb server, for
    archives with known limits; ``metrics`` receives each HTTP request's duration.
    """

    kind = "dicomweb"

    def __init__(
        self,
        cfg: UpstreamConfig,
        qido: QidoOptions = QidoOptions(),
        *,
        session: aiohttp.ClientSession | None = None,
        signer: Signer | None = None,
        capabilities: Capabilities | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.cfg = cfg
        self.qido = qido
        self.url = cfg.url.rstrip("/")
        self.http = HttpClient(
            self.url,
            timeout=cfg.timeout,
            connect_timeout=cfg.connect_timeout,
            verify_tls=cfg.verify_tls,
            session=session,
            signer=signer if signer is not None else config_signer(cfg.auth, cfg.verify_tls),
            metrics=metrics,
            max_answer=cfg.max_answer_mb * MIB,
        )
        self._capabilities = capabilities or Capabilities(delete=None)
        self._wado_accept = 0  # index into WADO_ACCEPTS of the first one the archive took

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()

    async def store_instances(
        self, study_uid: str, instances: Sequence[StoreItem]
    ) -> list[StoreOutcome]:
        # (each file's preamble is the spool record's own: the archive gets zeros)
        body = FileMultipart([(i.path, i.size) for i in instances], mediatypes.DICOM, blank_head=PREAMBLE)
        headers = {
            "Content-Type": mediatypes.multipart_related(mediatypes.DICOM, body.boundary),
            "Content-Length": str(body.content_length),
            "Accept": mediatypes.DICOM_JSON,
        }
        url = self.http.url(f"studies/{study_uid}")

        def all_(kind: str, error: str, retry_after: float | None = None) -> list[StoreOutcome]:
            return [StoreOutcome(kind, error, retry_after) for _ in instances]

        try:
            async with self.http.request(
                "POST", url, what="store", headers=headers, data=body,
                body=await self._stow_body(body), passthrough=EVERY_STATUS,
            ) as resp:
                status = resp.status
                # (a 409's body names the instances refused: read as a success's is)
                payload = await read_at_most(resp, self.http.max_answer, "STOW-RS")
                content_type = resp.headers.get("Content-Type", "")
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                answer_headers = resp.headers.copy()
        except (UpstreamUnavailable, AnswerTooLarge) as exc:  # (a broken answer: the batch goes again)
            return all_("retry", str(exc))
        except UpstreamAuthError as exc:  # from the signer: no credential to send
            return all_("config", str(exc))

        if status >= 400:
            log.debug("STOW-RS %s error body: %s", http_status(status), _short(payload), extra=PATIENT_DATA)
        if status in RETRYABLE_HTTP:
            return all_("retry", http_status(status), retry_after)
        if status in CONFIG_REFUSALS:
            return all_("config", self._config_refusal(status, answer_headers))
        parsed = parse_stow_response(payload, content_type)
        if status >= 400 and (status != 409 or not parsed.parsed):
            if len(instances) > 1:
                # Refused as a whole without saying which instance is at fault (Orthanc
                # answers 400 when one part is bad, having stored the others): one bad
                # instance must not take the batch down, so each goes again on its own.
                log.warning(
                    "STOW-RS of %d instances of study %s refused as a whole (HTTP %d); sending each alone",
                    len(instances),
                    study_uid,
                    status,
                )
                outcomes: list[StoreOutcome] = []
                for inst in instances:
                    outcomes += await self.store_instances(study_uid, [inst])
                return outcomes
            if status == 409:
                return all_("rejected", f"{http_status(409)} without a readable response")
            if status == 413:
                return all_("rejected", (
                    f"{http_status(413)}: the archive, or a proxy before it, takes no request of {body.content_length}"
                    " bytes; raise its limit, then `dicom-gateway spool retry --dead`"
                ))
            return all_("rejected", http_status(status))
        if not parsed.parsed:
            # A 2xx with no Store Instances Response: the request as a whole succeeded.
            return all_("delivered", "")

        outcomes = []
        for inst in instances:
            uid = inst.sop_instance_uid
            if uid in parsed.failed:
                reason = parsed.failed[uid]
                if reason in ALREADY_STORED:
                    outcomes.append(StoreOutcome("delivered", "already stored upstream"))
                elif reason in TRANSIENT:
                    outcomes.append(
                        StoreOutcome("retry", f"HTTP {status}, failure reason {reason:#06x}")
                    )
                else:
                    outcomes.append(
                        StoreOutcome("rejected", f"HTTP {status}, failure reason {reason:#06x}")
                    )
            elif uid in parsed.referenced:
                outcomes.append(StoreOutcome("delivered", ""))
            else:
                outcomes.append(
                    StoreOutcome("retry", f"HTTP {status}: instance missing from the response")
                )
        return outcomes

    async def _stow_body(self, body: FileMultipart) -> Body:
        """What the signer may know of a STOW-RS body: its length (it is streamed from
        the spool files, so no hash). May raise UpstreamUnavailable."""
        return Body.streamed(body.content_length)

    def _config_refusal(self, status: int, headers: Mapping[str, str]) -> str:
        """The reason delivery is held when the archive refused a STOW-RS as a whole with
        a status of CONFIG_REFUSALS; archives that say more in their headers say it here."""
        return CONFIG_REFUSALS[status]

    async def health(self) -> Health:
        try:
            async with self.http.request(
                "GET", self.http.url("studies", "limit=1"), what="health probe",
                headers={"Accept": mediatypes.DICOM_JSON}, timeout=aiohttp.ClientTimeout(total=5),
                passthrough=EVERY_STATUS,
            ) as resp:
                await read_error_body(resp)
                return Health(resp.status < 400, f"HTTP {resp.status}")
        except UpstreamError as exc:
            return Health(False, str(exc))

    # -- search ------------------------------------------------------------------------

    def _search_query(self, path: str, search: Search, limit: int, offset: int) -> str:
        """The encoded query string of one page of a search of the resource ``path``."""
        return query_string(search, self.qido, limit, offset)

    async def _page(self, path: str, search: Search, offset: int, limit: int) -> tuple[list[JsonObject], bool]:
        """One QIDO-RS page: (objects, whether the server says it cut the page short)."""
        url = self.http.url(path, self._search_query(path, search, limit, offset))
        timeout = aiohttp.ClientTimeout(total=self.qido.timeout, sock_connect=self.cfg.connect_timeout)
        try:
            async with self.http.request(
                "GET", url, what="search", headers={"Accept": mediatypes.DICOM_JSON}, timeout=timeout
            ) as resp:
                body = await read_at_most(resp, self.http.max_answer, "search")
                status = resp.status
                cut = _more_results_warning(resp)
        except NotFound:
            if path.startswith("studies/"):
                return [], False  # the study or series named in the path does not exist
            raise UpstreamRejected("archive rejected search: HTTP 404", 404) from None
        if status == 204 or not body.strip():
            return [], cut
        try:
            page = json.loads(body)
        except (ValueError, RecursionError):  # (JSON nested thousands deep)
            raise UpstreamRejected("archive answered a search with invalid JSON", status) from None
        if not isinstance(page, list):
            raise UpstreamRejected("archive answered a search with a non-array", status)
        return [item for item in page if isinstance(item, dict)], cut

    async def _capped_page(
        self, path: str, search: Search, offset: int, limit: int, proven: int
    ) -> tuple[list[JsonObject], bool, int]:
        """`_page`, and the ``limit`` it was answered for. An archive that refuses a
        ``limit`` above its own cap with 400 (Azure's DICOM service takes 1 to 200)
        after taking ``proven`` for the same query gets this page again with
        ``proven``, and every later page of every search too."""
        try:
            page, cut = await self._page(path, search, offset, limit)
            return page, cut, limit
        except UpstreamRejected as exc:
            if exc.status != 400 or limit <= proven:
                raise
        if self._capabilities.max_page != proven:  # said once, though two pages may learn it at once
            log.warning(
                "QIDO-RS: archive refused limit=%d after taking limit=%d for the same search; pages of %d from now on "
                "(set find.page_size to its cap)", limit, proven, proven,
            )
            self._capabilities = replace(self._capabilities, max_page=proven)
        page, cut = await self._page(path, search, offset, proven)
        return page, cut, proven

    async def _search(self, level: str, search: Search) -> AsyncGenerator[JsonObject, None]:
        """Page through one QIDO-RS resource with limit/offset until it is exhausted.

        Once the first page comes back full, `PAGES_AHEAD` pages are asked at once
        past the one being answered, each twice the size of the one before (up to
        ``find.page_size``): an archive such as Orthanc builds each answer whole on one
        core, so a long search is built on two cores while the answers of the pages
        before go out. Memory stays bounded by those pages. A page that
        comes back shorter (or longer) than asked, while more results exist, makes the
        pages asked after it start at the wrong offset: they are dropped and asked
        again from where it ended.
        A page shorter than ``limit`` ends the search unless the server says, with a
        Warning header, that it cut the page; so ``find.page_size`` must not exceed the
        archive's own cap (AWS HealthImaging: 1000) on servers that cut silently, and
        is lowered to ``Capabilities.max_page`` when that is known.
        Closing the iterator (C-CANCEL, match cap) cancels the requests in flight.

        Ends with SearchTruncated when the archive announced more results (Warning)
        and then sent none, or when a full page reaches ``Capabilities.search_limit``:
        what lies beyond cannot be asked for.

        The first page holds at most ``FIRST_PAGE`` results: archives such as Orthanc
        send nothing until a whole page is built (about 0.35 ms per study), so a
        small first page lets the first answers go out while the rest is searched.

        A search naming more UIDs than fit in one URL is asked in parts
        (`split_long_lists`), one after another; a match two parts both answer (none
        should) is sent once.
        """
        seen: set[str] = set()
        for part in split_long_lists(search):
            async with contextlib.aclosing(self._search_part(level, part, seen)) as items:  # a C-CANCEL closes it now
                async for item in items:
                    yield item

    async def _search_part(self, level: str, search: Search, seen: set[str]) -> AsyncGenerator[JsonObject, None]:
        """One search of `_search`, paged; ``seen``: the UIDs answered so far."""
        caps = self._capabilities
        path = resource_path(level, search.study_uid, search.series_uid)
        reach = caps.search_limit

        def bounded(limit: int, offset: int) -> int:
            return limit if reach is None else min(limit, reach - offset)

        def page_size() -> int:
            cap = self._capabilities.max_page  # may be learned during this search
            return min(self.qido.page_size, cap or self.qido.page_size)

        first = bounded(min(page_size(), FIRST_PAGE), 0)
        ahead: collections.deque[tuple[int, int, asyncio.Future[tuple[list[JsonObject], bool, int]]]] = collections.deque()

        def ask(offset: int, limit: int) -> None:
            ahead.append((offset, limit, asyncio.ensure_future(self._capped_page(path, search, offset, limit, first))))

        ask(0, first)
        size, announced = first, False  # announced: the previous page said more results exist
        uid_tag = LEVEL_UID_TAGS[level]
        try:
            while True:
                offset, asked, pending = ahead.popleft()
                page, cut, limit = await pending
                if not page and (cut or announced):
                    log.warning("QIDO-RS %s: archive announced more results than it sent (%d)", level, offset)
                    raise SearchTruncated(f"archive announced more than the {offset} results it sent", offset)
                more = bool(page) and (len(page) >= limit or cut)
                end = offset + len(page)
                announced = cut
                capped = more and reach is not None and end >= reach
                if not more or capped or len(page) != asked:
                    await _cancel_all(ahead)  # asked past the end, or from an offset this page did not reach
                if more and not capped:
                    following = ahead[-1][0] + ahead[-1][1] if ahead else end
                    while len(ahead) < PAGES_AHEAD and (reach is None or following < reach):
                        size = min(page_size(), size * 2)
                        ask(following, bounded(size, following))
                        following += ahead[-1][1]
                for item in page:
                    uid = first_text(item, uid_tag)
                    if uid:
                        if uid in seen:
                            # Azure's DICOM service pages newest first, so a match stored
                            # during the search shifts the pages and repeats one.
                            log.debug("QIDO-RS %s: %s answered twice; sent once", level, uid)
                            continue
                        seen.add(uid)
                    yield item
                if capped:
                    log.warning("QIDO-RS %s: search reached the archive's limit of %d results", level, reach)
                    raise SearchTruncated(f"archive lets a search reach {reach} results only", end)
                if not more:
                    return
        finally:
            await _cancel_all(ahead)

    def search_for_studies(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._search("studies", search)

    def search_for_series(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._search("series", search)

    def search_for_instances(self, search: Search) -> AsyncGenerator[JsonObject, None]:
        return self._search("instances", search)

    # -- retrieve ----------------------------------------------------------------------

    def _image_set_query(self, image_set_id: str | None) -> str:
        """The query naming an image set in a WADO-RS URL: none here (a plain DICOMweb
        archive has no image sets); HealthImaging's ``imageSetId``."""
        return ""

    def _instance_accepts(self, acceptable: Sequence[str]) -> list[tuple[str, int | None]]:
        """(Accept, index in WADO_ACCEPTS or None) to try in order for ``acceptable``."""
        out: list[tuple[str, int | None]] = []
        for syntax in acceptable:
            if syntax == "*":
                out += [(WADO_ACCEPTS[i], i) for i in range(self._wado_accept, len(WADO_ACCEPTS))]
            else:
                out.append((mediatypes.multipart_accept(mediatypes.DICOM, syntax), None))
        return out

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
        url = self.http.url(f"studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}", self._image_set_query(image_set_id))
        for accept, index in self._instance_accepts(acceptable):
            found = await self._wado(url, accept, spill_area, spill_bytes)
            if found is None:
                continue
            if index is not None and index != self._wado_accept:
                log.warning("WADO-RS: archive refused %r; using %r", WADO_ACCEPTS[self._wado_accept], accept)
                self._wado_accept = index
            return found
        raise UpstreamRejected("archive offers the instance in no representation we accept", 406)

    def _check_bulk(self, series_uid: str | None) -> None:
        caps = self._capabilities
        if series_uid is None and not caps.study_retrieve:
            raise NotSupported("archive does not retrieve whole studies")
        if series_uid is not None and not caps.series_retrieve:
            raise NotSupported("archive does not retrieve whole series")

    async def iter_instances(
        self, study_uid: str, series_uid: str | None, spill_area: SpillArea, spill_bytes: int
    ) -> AsyncGenerator[Retrieved, None]:
        """RetrieveSeries (RetrieveStudy when ``series_uid`` is None) as a stream.

        One request instead of one per instance saves the archive and us a round trip
        and a response each. The request has no total timeout, since a study may take
        longer than any fixed bound to read at the pace the receiver takes it; instead
        the archive must send something every ``timeout`` seconds while we read (aiohttp
        stops that clock while the receiver's pace has paused our reading).
        """
        self._check_bulk(series_uid)
        url = self.http.url(f"studies/{study_uid}" + (f"/series/{series_uid}" if series_uid else ""))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.timeout)
        for index in range(self._wado_accept, len(WADO_ACCEPTS)):
            try:
                async with self.http.request(
                    "GET", url, what="retrieve", headers={"Accept": WADO_ACCEPTS[index]}, timeout=timeout,
                    passthrough=NOT_ACCEPTABLE,
                ) as resp:
                    if resp.status in NOT_ACCEPTABLE:
                        await read_error_body(resp)
                        continue
                    content_type = resp.headers.get("Content-Type", "")
                    if not content_type.lower().startswith(mediatypes.MULTIPART_RELATED):
                        raise UpstreamRejected(f"RetrieveSeries answered {content_type!r}, not multipart")
                    parts = iter_parts(resp.content.iter_any(), boundary_of(content_type), spill_area, spill_bytes)
                    async for part in parts:
                        if part.data is not None:
                            item = Retrieved(part.data, None, 0, part.length)
                        else:
                            item = Retrieved(None, part.path, 0, part.length, temporary=True)
                        item.transfer_syntax = await _syntax_of(item, part.headers.get("content-type", ""), content_type)
                        yield item
                    return
            except MultipartError as exc:
                raise UpstreamRejected(f"unreadable WADO-RS answer: {exc}") from None
        raise UpstreamRejected("archive offers the instances in no representation we accept", 406)

    async def _wado(self, url: URL, accept: str, spill_area: SpillArea, spill_bytes: int) -> Retrieved | None:
        """One RetrieveInstance attempt; None when the archive cannot answer ``accept``."""
        spill: Path | None = None
        try:
            async with self.http.request(
                "GET", url, what="retrieve", headers={"Accept": accept}, passthrough=NOT_ACCEPTABLE
            ) as resp:
                if resp.status in NOT_ACCEPTABLE:
                    await read_error_body(resp)
                    return None
                content_type = resp.headers.get("Content-Type", "")
                length = resp.content_length
                # (a gzip answer's length is not what it inflates to)
                if length is not None and length <= spill_bytes and "Content-Encoding" not in resp.headers:
                    data: bytes | None = await resp.read()
                else:
                    data, spill = await _read_or_spill(resp, spill_area, spill_bytes)
        except UpstreamError:
            _unlink(spill)
            raise
        try:
            found, part_type = _locate_instance(content_type, data, spill)
        except MultipartError as exc:
            _unlink(spill)
            raise UpstreamRejected(f"unreadable WADO-RS answer: {exc}") from None
        found.transfer_syntax = await _syntax_of(found, part_type, content_type)
        return found

    async def retrieve_metadata(
        self,
        study_uid: str,
        series_uid: str | None = None,
        sop_instance_uid: str | None = None,
        *,
        image_set_id: str | None = None,
    ) -> list[JsonObject]:
        if not self._capabilities.metadata:
            raise NotSupported("archive does not serve metadata")
        url = self.http.url(_resource(study_uid, series_uid, sop_instance_uid) + "/metadata", self._image_set_query(image_set_id))
        async with self.http.request(
            "GET", url, what="metadata retrieve", headers={"Accept": mediatypes.DICOM_JSON}
        ) as resp:
            body = await read_at_most(resp, self.http.max_answer, "metadata")
        try:
            objects = json.loads(body)
        except (ValueError, RecursionError):
            raise UpstreamRejected("archive answered metadata with invalid JSON") from None
        if not isinstance(objects, list):
            raise UpstreamRejected("archive answered metadata with a non-array")
        return [item for item in objects if isinstance(item, dict)]

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
        """RetrieveFrames as a stream: each frame as soon as its part has arrived.

        Each frame's syntax is its part's ``transfer-syntax`` parameter, else the
        answer's, else the one syntax asked for, else Explicit VR Little Endian for
        ``application/octet-stream`` (PS3.18's default for it); a compressed part whose
        syntax nothing names is refused. Orthanc 1.10 answers 500 (not 406) for a
        syntax it cannot convert to: ask ``*`` there.
        """
        if not self._capabilities.frames:
            raise NotSupported("archive does not serve frames")
        _check_frame_numbers(frame_numbers)
        path = _resource(study_uid, series_uid, sop_instance_uid)
        url = self.http.url(f"{path}/frames/{','.join(str(n) for n in frame_numbers)}", self._image_set_query(image_set_id))
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.timeout)
        for accept, asked in _frame_accepts(acceptable):
            try:
                async with self.http.request(
                    "GET", url, what="frames retrieve", headers={"Accept": accept}, timeout=timeout,
                    passthrough=FRAMES_NOT_ACCEPTABLE,
                ) as resp:
                    if resp.status in FRAMES_NOT_ACCEPTABLE:
                        await read_error_body(resp)
                        continue
                    content_type = resp.headers.get("Content-Type", "")
                    if not content_type.lower().startswith(mediatypes.MULTIPART_RELATED):
                        if len(frame_numbers) != 1:
                            raise UpstreamRejected(f"RetrieveFrames answered {content_type!r}, not multipart")
                        data = await read_at_most(resp, self.http.max_answer, "frame")
                        yield Frame(frame_numbers[0], data, _frame_syntax(content_type, "", asked))
                        return
                    # Frames are handed out as bytes: nothing is spilled, so no directory is written.
                    parts = iter_parts(
                        resp.content.iter_any(), boundary_of(content_type), SpillArea(Path(tempfile.gettempdir())), sys.maxsize,
                        max_part=self.http.max_answer,
                    )
                    sent = 0
                    async for part in parts:
                        if sent == len(frame_numbers):
                            raise UpstreamRejected(f"archive answered more than the {sent} frames asked for")
                        assert part.data is not None
                        syntax = _frame_syntax(part.headers.get("content-type", ""), content_type, asked)
                        yield Frame(frame_numbers[sent], part.data, syntax)
                        sent += 1
                    if sent != len(frame_numbers):
                        raise UpstreamRejected(f"archive answered {sent} of {len(frame_numbers)} frames")
                    return
            except MultipartError as exc:
                raise UpstreamRejected(f"unreadable WADO-RS answer: {exc}") from None
        raise UpstreamRejected("archive offers the frames in no representation we accept", 406)

    # -- delete ------------------------------------------------------------------------

    async def _delete(self, path: str) -> None:
        """DELETE a resource (Azure, dcm4chee); NotSupported once the archive said 405/501."""
        if self._capabilities.delete is False:
            raise NotSupported("archive does not delete over DICOMweb")
        async with self.http.request(
            "DELETE", self.http.url(path), what="delete", passthrough=DELETE_NOT_SUPPORTED
        ) as resp:
            await read_error_body(resp)
            status = resp.status
        if status in DELETE_NOT_SUPPORTED:
            log.warning("DICOMweb DELETE: archive answered HTTP %d; deletion is not supported", status)
            self._capabilities = replace(self._capabilities, delete=False)
            raise NotSupported(f"archive does not delete over DICOMweb: HTTP {status}", status)
        if self._capabilities.delete is None:
            self._capabilities = replace(self._capabilities, delete=True)

    async def delete_study(self, study_uid: str) -> None:
        await self._delete(_resource(study_uid))

    async def delete_series(self, study_uid: str, series_uid: str) -> None:
        await self._delete(_resource(study_uid, series_uid))

    async def delete_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> None:
        await self._delete(_resource(study_uid, series_uid, sop_instance_uid))


def _resource(study_uid: str, series_uid: str | None = None, sop_instance_uid: str | None = None) -> str:
    """The WADO-RS path of a study, series or instance."""
    if sop_instance_uid is not None and series_uid is None:
        raise ValueError("an instance is addressed within its series")
    path = f"studies/{study_uid}"
    if series_uid is not None:
        path += f"/series/{series_uid}"
    if sop_instance_uid is not None:
        path += f"/instances/{sop_instance_uid}"
    return path


def _check_frame_numbers(frame_numbers: Sequence[int]) -> None:
    if not frame_numbers or any(n < 1 for n in frame_numbers):
        raise UpstreamRejected("frame numbers must be given and start at 1", 400)


def _frame_accepts(acceptable: Sequence[str]) -> list[tuple[str, str | None]]:
    """(Accept, the syntax it names or None) to try in order for ``acceptable``."""
    out: list[tuple[str, str | None]] = []
    for syntax in acceptable:
        if syntax == "*":
            out += [(accept, None) for accept in FRAME_ACCEPTS]
        else:
            out.append((mediatypes.multipart_accept(mediatypes.frame_media_type(syntax), syntax), syntax))
    return out


def _frame_syntax(part_type: str, answer_type: str, asked: str | None) -> str:
    """A frame's transfer syntax: see `DicomWebUpstream.retrieve_frames`."""
    syntax = mediatypes.transfer_syntax_param(part_type) or mediatypes.transfer_syntax_param(answer_type) or asked
    if syntax:
        return syntax
    if mediatypes.media_type(part_type) in ("", mediatypes.OCTET_STREAM):
        return EXPLICIT_VR_LE
    raise UpstreamRejected(f"frame of type {mediatypes.media_type(part_type)!r} without a transfer syntax")


async def _syntax_of(item: Retrieved, part_type: str, answer_type: str) -> str:
    """The transfer syntax a retrieved instance came in: as its part's or the answer's
    Content-Type names it, else as its File Meta says ("" if it has no readable one)."""
    named = mediatypes.transfer_syntax_param(part_type) or mediatypes.transfer_syntax_param(answer_type)
    if named:
        return named
    head: bytes | memoryview
    if item.data is not None:
        head = memoryview(item.data)[item.offset : item.offset + min(META_HEAD, item.length)]
    else:
        head = await asyncio.to_thread(item.read, 0, META_HEAD)
    item.head = head  # for the retrieval engine's look at the File Meta
    try:
        return read_file_meta(head).transfer_syntax
    except ValueError:
        return ""


async def _read_or_spill(
    resp: aiohttp.ClientResponse, spill_area: SpillArea, spill_bytes: int
) -> tuple[bytes | None, Path | None]:
    """Read the body into memory until it passes ``spill_bytes``, then into a file."""
    buffer = bytearray()
    async for chunk in resp.content.iter_chunked(SPILL_CHUNK):
        buffer += chunk
        if len(buffer) > spill_bytes:
            break
    else:
        return bytes(buffer), None
    with spill_area.writer(".wado") as out:
        out.write(buffer)
        del buffer
        async for chunk in resp.content.iter_chunked(SPILL_CHUNK):
            out.write(chunk)
    return None, out.path


def _locate_instance(content_type: str, data: bytes | None, spill: Path | None) -> tuple[Retrieved, str]:
    """The Part 10 file inside a WADO-RS answer, its only part (with that part's
    Content-Type), or the whole body when the archive answered plain ``application/dicom``."""
    if not content_type.lower().startswith(mediatypes.MULTIPART_RELATED):
        if spill is not None:
            return Retrieved(None, spill, 0, spill.stat().st_size, temporary=True), content_type
        assert data is not None
        return Retrieved(data, None, 0, len(data)), content_type
    boundary = boundary_of(content_type)
    if spill is not None:
        span = single_part_in_file(spill, boundary)
        return Retrieved(None, spill, span.offset, span.length, temporary=True), span.headers.get("content-type", "")
    assert data is not None
    parts = split_parts(data, boundary)
    if len(parts) != 1:
        raise MultipartError(f"{len(parts)} parts for one instance")
    return Retrieved(data, None, parts[0].offset, parts[0].length), parts[0].headers.get("content-type", "")


def _unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
