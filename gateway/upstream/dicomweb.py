"""A generic DICOMweb archive (Orthanc, dcm4chee, Azure, Google) reached over HTTP(S)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from pathlib import Path

import aiohttp
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.dicomweb import mediatypes
from gateway.dicomweb.auth import auth_headers
from gateway.dicomweb.multipart import FileMultipart
from gateway.dicomweb.multipart_reader import MultipartError, boundary_of, iter_parts, single_part_in_file, split_parts
from gateway.model.search import Search
from gateway.dicomweb.qido import QidoOptions, query_string, resource_path
from gateway.dicomweb.stow import ALREADY_STORED, TRANSIENT, parse_stow_response
from gateway.upstream.base import Health, JsonObject, Retrieved, StoreItem, StoreOutcome
from gateway.upstream.errors import (
    NotFound,
    UpstreamAuthError,
    UpstreamError,
    UpstreamRejected,
    UpstreamUnavailable,
)

log = logging.getLogger("gateway.upstream")

RETRYABLE_HTTP = frozenset({408, 429}) | frozenset(range(500, 600))
# Whole-request refusals that say the gateway's credentials (401, 403) or URL (404,
# 405: nothing, or no STOW-RS service, there) are wrong. They do not depend on the
# instances sent, so they hold delivery instead of making instances dead.
CONFIG_REFUSALS = {
    401: "archive refused our credentials (HTTP 401); check upstream.auth",
    403: "archive denied us access (HTTP 403); check upstream.auth and the archive's permissions",
    404: "no STOW-RS service at the upstream URL (HTTP 404); check upstream.url",
    405: "no STOW-RS service at the upstream URL (HTTP 405); check upstream.url",
}


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds, from either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _short(body: bytes, limit: int = 200) -> str:
    """A one-line excerpt of an error body, for DEBUG logs only: archives' error pages
    may echo the attributes (patient name, ID) of what they refused."""
    text = body[:limit].decode("utf-8", "replace")
    return " ".join(text.split())


def http_status(status: int) -> str:
    """``HTTP 503 Service Unavailable``: the code and its standard phrase, never the
    archive's own reason phrase, which, like its error body, may quote patient data."""
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def _more_results_warning(resp: aiohttp.ClientResponse) -> bool:
    """PS3.18 10.6.3.3: a Warning header saying the server cut the page short."""
    return any("additional results" in w.lower() for w in resp.headers.getall("Warning", []))


# Results in the first QIDO-RS page of a search (later pages hold find.page_size).
FIRST_PAGE = 100

# Accept headers for RetrieveInstance, best first: the stored syntax (no transcoding by
# the archive, no size blow-up), then whatever the archive prefers to send.
WADO_ACCEPTS = (
    mediatypes.multipart_accept(mediatypes.DICOM, "*"),
    mediatypes.multipart_accept(mediatypes.DICOM),
)
# Statuses that mean "not in that representation": try the next Accept.
NOT_ACCEPTABLE = frozenset({400, 406, 415})
SPILL_CHUNK = 1 << 20


class DicomWebUpstream:
    """STOW-RS and QIDO-RS (later WADO-RS) against one base URL."""

    kind = "dicomweb"

    def __init__(self, cfg: UpstreamConfig, qido: QidoOptions = QidoOptions()) -> None:
        self.cfg = cfg
        self.qido = qido
        self.url = cfg.url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None
        self._wado_accept = 0  # index into WADO_ACCEPTS of the first one the archive took

    async def start(self) -> None:
        ssl_ctx: ssl.SSLContext | bool = True if self.cfg.verify_tls else False
        self._session = aiohttp.ClientSession(
            headers=auth_headers(self.cfg.auth),
            timeout=aiohttp.ClientTimeout(
                total=self.cfg.timeout, sock_connect=self.cfg.connect_timeout
            ),
            connector=aiohttp.TCPConnector(limit=64, ssl=ssl_ctx),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("DicomWebUpstream used before start()")
        return self._session

    async def store_instances(
        self, study_uid: str, instances: Sequence[StoreItem]
    ) -> list[StoreOutcome]:
        body = FileMultipart([(i.path, i.size) for i in instances], mediatypes.DICOM)
        headers = {
            "Content-Type": mediatypes.multipart_related(mediatypes.DICOM, body.boundary),
            "Content-Length": str(body.content_length),
            "Accept": mediatypes.DICOM_JSON,
        }
        url = f"{self.url}/studies/{study_uid}"

        def all_(kind: str, error: str, retry_after: float | None = None) -> list[StoreOutcome]:
            return [StoreOutcome(kind, error, retry_after) for _ in instances]

        try:
            async with self.session.post(url, data=body, headers=headers) as resp:
                payload = await resp.read()
                status = resp.status
                content_type = resp.headers.get("Content-Type", "")
                retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except asyncio.TimeoutError:
            return all_("retry", f"timeout after {self.cfg.timeout:g}s posting to {url}")
        except aiohttp.ClientError as exc:
            return all_("retry", f"{type(exc).__name__}: {exc}")
        except OSError as exc:
            return all_("retry", f"cannot read spool file: {exc}")

        if status >= 400:
            log.debug("STOW-RS %s error body: %s", http_status(status), _short(payload))
        if status in RETRYABLE_HTTP:
            return all_("retry", http_status(status), retry_after)
        if status in CONFIG_REFUSALS:
            return all_("config", CONFIG_REFUSALS[status])
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

    async def health(self) -> Health:
        try:
            async with self.session.get(
                f"{self.url}/studies",
                params={"limit": "1"},
                headers={"Accept": mediatypes.DICOM_JSON},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                await resp.read()
                if resp.status < 400:
                    return Health(True, f"HTTP {resp.status}")
                return Health(False, f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return Health(False, f"{type(exc).__name__}: {exc}".strip())

    async def _page(self, path: str, search: Search, offset: int, limit: int) -> tuple[list[JsonObject], bool]:
        """One QIDO-RS page: (objects, whether the server says it cut the page short)."""
        url = URL(f"{self.url}/{path}?{query_string(search, self.qido, limit, offset)}", encoded=True)
        timeout = aiohttp.ClientTimeout(total=self.qido.timeout, sock_connect=self.cfg.connect_timeout)
        resource = path.rsplit("/", 1)[-1]
        try:
            async with self.session.get(url, headers={"Accept": mediatypes.DICOM_JSON}, timeout=timeout) as resp:
                body = await resp.read()
                status = resp.status
                cut = _more_results_warning(resp)
        except asyncio.TimeoutError:
            raise UpstreamUnavailable(f"archive timeout after {self.qido.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"archive unreachable: {type(exc).__name__}") from None
        if status in (401, 403):
            log.error("QIDO-RS %s refused our credentials: HTTP %d", resource, status)
            raise UpstreamAuthError(f"archive refused credentials: HTTP {status}", status)
        if status in RETRYABLE_HTTP:
            log.warning("QIDO-RS %s failed: %s", resource, http_status(status))
            log.debug("QIDO-RS error body: %s", _short(body))
            raise UpstreamUnavailable(f"archive error: {http_status(status)}")
        if status == 404 and path.startswith("studies/"):
            return [], False  # the study or series named in the path does not exist
        if status >= 400:
            log.debug("QIDO-RS error body: %s", _short(body))
            raise UpstreamRejected(f"archive rejected search: {http_status(status)}", status)
        if status == 204 or not body.strip():
            return [], False
        try:
            page = json.loads(body)
        except ValueError:
            raise UpstreamRejected("archive answered a search with invalid JSON", status) from None
        if not isinstance(page, list):
            raise UpstreamRejected("archive answered a search with a non-array", status)
        return [item for item in page if isinstance(item, dict)], cut

    async def _search(self, level: str, search: Search) -> AsyncIterator[JsonObject]:
        """Page through one QIDO-RS resource with limit/offset until it is exhausted.

        The next page is requested while the current one is being answered (one page
        ahead, so memory stays bounded), which hides most of the archive's latency.
        A page shorter than ``limit`` ends the search unless the server says, with a
        Warning header, that it cut the page; so ``find.page_size`` must not exceed the
        archive's own cap (AWS HealthImaging: 1000) on servers that cut silently.
        Closing the iterator (C-CANCEL, match cap) cancels the request in flight.

        The first page holds at most ``FIRST_PAGE`` results: archives such as Orthanc
        send nothing until a whole page is built (about 0.35 ms per study), so a
        small first page lets the first answers go out while the rest is searched.
        """
        path = resource_path(level, search.study_uid, search.series_uid)
        offset = 0
        limit = min(self.qido.page_size, FIRST_PAGE)
        pending = asyncio.ensure_future(self._page(path, search, offset, limit))
        try:
            while True:
                page, cut = await pending
                more = bool(page) and (len(page) >= limit or cut)
                offset += len(page)
                limit = self.qido.page_size
                if more:
                    pending = asyncio.ensure_future(self._page(path, search, offset, limit))
                for item in page:
                    yield item
                if not more:
                    return
        finally:
            if not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await pending

    def search_for_studies(self, search: Search) -> AsyncIterator[JsonObject]:
        return self._search("studies", search)

    def search_for_series(self, search: Search) -> AsyncIterator[JsonObject]:
        return self._search("series", search)

    def search_for_instances(self, search: Search) -> AsyncIterator[JsonObject]:
        return self._search("instances", search)

    async def retrieve_instance(
        self, study_uid: str, series_uid: str, sop_instance_uid: str, spill_dir: Path, spill_bytes: int
    ) -> Retrieved:
        url = f"{self.url}/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"
        for index in range(self._wado_accept, len(WADO_ACCEPTS)):
            found = await self._wado(url, WADO_ACCEPTS[index], spill_dir, spill_bytes)
            if found is not None:
                if index != self._wado_accept:
                    log.warning("WADO-RS: archive refused %r; using %r", WADO_ACCEPTS[self._wado_accept], WADO_ACCEPTS[index])
                    self._wado_accept = index
                return found
        raise UpstreamRejected("archive offers the instance in no representation we accept")

    async def iter_instances(
        self, study_uid: str, series_uid: str | None, spill_dir: Path, spill_bytes: int
    ) -> AsyncIterator[Retrieved]:
        """RetrieveSeries (RetrieveStudy when ``series_uid`` is None) as a stream.

        One request instead of one per instance saves the archive and us a round trip
        and a response each. The request has no total timeout, since a study may take
        longer than any fixed bound to read at the pace the receiver takes it; instead
        the archive must send something every ``timeout`` seconds while we read (aiohttp
        stops that clock while the receiver's pace has paused our reading).
        """
        url = f"{self.url}/studies/{study_uid}" + (f"/series/{series_uid}" if series_uid else "")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout, sock_read=self.cfg.timeout)
        for index in range(self._wado_accept, len(WADO_ACCEPTS)):
            try:
                async with self.session.get(url, headers={"Accept": WADO_ACCEPTS[index]}, timeout=timeout) as resp:
                    if resp.status in NOT_ACCEPTABLE:
                        await resp.read()
                        continue
                    if resp.status >= 300:
                        _raise_for_retrieve(resp.status, await resp.read())
                    content_type = resp.headers.get("Content-Type", "")
                    if not content_type.lower().startswith(mediatypes.MULTIPART_RELATED):
                        raise UpstreamRejected(f"RetrieveSeries answered {content_type!r}, not multipart")
                    parts = iter_parts(resp.content.iter_any(), boundary_of(content_type), spill_dir, spill_bytes)
                    async for part in parts:
                        if part.data is not None:
                            yield Retrieved(part.data, None, 0, part.length)
                        else:
                            yield Retrieved(None, part.path, 0, part.length, temporary=True)
                    return
            except asyncio.TimeoutError:
                raise UpstreamUnavailable(f"archive silent for {self.cfg.timeout:g} s") from None
            except aiohttp.ClientError as exc:
                raise UpstreamUnavailable(f"archive unreachable: {type(exc).__name__}") from None
            except OSError as exc:
                raise UpstreamUnavailable(f"cannot spill the instance: {exc.strerror}") from None
            except MultipartError as exc:
                raise UpstreamRejected(f"unreadable WADO-RS answer: {exc}") from None
        raise UpstreamRejected("archive offers the instances in no representation we accept")

    async def _wado(self, url: str, accept: str, spill_dir: Path, spill_bytes: int) -> Retrieved | None:
        """One RetrieveInstance attempt; None when the archive cannot answer ``accept``."""
        spill: Path | None = None
        try:
            async with self.session.get(url, headers={"Accept": accept}) as resp:
                status = resp.status
                if status in NOT_ACCEPTABLE:
                    await resp.read()
                    return None
                if status >= 300:
                    body = await resp.read()
                    _raise_for_retrieve(status, body)
                content_type = resp.headers.get("Content-Type", "")
                length = resp.content_length
                if length is not None and length <= spill_bytes:
                    data: bytes | None = await resp.read()
                else:
                    data, spill = await _read_or_spill(resp, spill_dir, spill_bytes)
        except asyncio.TimeoutError:
            _unlink(spill)
            raise UpstreamUnavailable(f"archive timeout after {self.cfg.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            _unlink(spill)
            raise UpstreamUnavailable(f"archive unreachable: {type(exc).__name__}") from None
        except OSError as exc:
            _unlink(spill)
            raise UpstreamUnavailable(f"cannot spill the instance: {exc.strerror}") from None
        try:
            return _locate_instance(content_type, data, spill)
        except MultipartError as exc:
            _unlink(spill)
            raise UpstreamRejected(f"unreadable WADO-RS answer: {exc}") from None


def _raise_for_retrieve(status: int, body: bytes) -> None:
    """Turn a failed RetrieveInstance into the typed error the edges map."""
    log.debug("WADO-RS error body: %s", _short(body))
    if status == 404:
        raise NotFound("instance not in the archive")
    if status in (401, 403):
        log.error("WADO-RS refused our credentials: HTTP %d", status)
        raise UpstreamAuthError(f"archive refused credentials: HTTP {status}", status)
    if status in RETRYABLE_HTTP:
        raise UpstreamUnavailable(f"archive error: {http_status(status)}")
    raise UpstreamRejected(f"archive rejected retrieve: {http_status(status)}", status)


async def _read_or_spill(
    resp: aiohttp.ClientResponse, spill_dir: Path, spill_bytes: int
) -> tuple[bytes | None, Path | None]:
    """Read the body into memory until it passes ``spill_bytes``, then into a file."""
    buffer = bytearray()
    async for chunk in resp.content.iter_chunked(SPILL_CHUNK):
        buffer += chunk
        if len(buffer) > spill_bytes:
            break
    else:
        return bytes(buffer), None
    spill_dir.mkdir(parents=True, exist_ok=True)
    path = spill_dir / f"{uuid.uuid4().hex}.wado"
    try:
        with open(path, "wb") as fh:
            fh.write(buffer)
            del buffer
            async for chunk in resp.content.iter_chunked(SPILL_CHUNK):
                fh.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return None, path


def _locate_instance(content_type: str, data: bytes | None, spill: Path | None) -> Retrieved:
    """The Part 10 file inside a WADO-RS answer: its only part, or the whole body when
    the archive answered plain ``application/dicom``."""
    if not content_type.lower().startswith(mediatypes.MULTIPART_RELATED):
        if spill is not None:
            return Retrieved(None, spill, 0, spill.stat().st_size, temporary=True)
        assert data is not None
        return Retrieved(data, None, 0, len(data))
    boundary = boundary_of(content_type)
    if spill is not None:
        span = single_part_in_file(spill, boundary)
        return Retrieved(None, spill, span.offset, span.length, temporary=True)
    assert data is not None
    parts = split_parts(data, boundary)
    if len(parts) != 1:
        raise MultipartError(f"{len(parts)} parts for one instance")
    return Retrieved(data, None, parts[0].offset, parts[0].length)


def _unlink(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
