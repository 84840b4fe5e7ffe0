"""HTTP plumbing shared by every HTTP upstream (DICOMweb today, AWS HealthImaging next).

One `HttpClient` owns the session (injected by tests and the facade, or created here),
the base URL, a `Signer` called on every attempt, the egress proxy of the environment
(`gateway.upstream.proxy`), and the two mappings every request
needs: transport failures (aiohttp errors, timeouts, local file errors) to typed errors,
and HTTP statuses to typed errors. Both live here and nowhere else, so an archive type
only decides which statuses it handles itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Container, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any, Protocol, runtime_checkable

import aiohttp
from yarl import URL

from gateway.logfmt import PATIENT_DATA
from gateway.metrics import Metrics
from gateway.spill import SpillFull
from gateway.upstream.errors import AnswerTooLarge, NotFound, UpstreamAuthError, UpstreamRejected, UpstreamUnavailable
from gateway.upstream.proxy import proxy_for

log = logging.getLogger("gateway.upstream")

RETRYABLE_HTTP = frozenset({408, 429}) | frozenset(range(500, 600))
# Failed Dependency: the archive's own storage or key vault is out of its reach (Azure's
# DICOM service); a read or search may work later, as after a 503.
DEPENDENCY_FAILED = 424
# For `HttpClient.request(passthrough=...)`: the caller reads every status itself.
EVERY_STATUS = range(100, 600)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Of an error body only an excerpt is ever logged (`short`) or parsed (Azure's error
# JSON): more is not read.
ERROR_BODY_LIMIT = 64 * 1024
MIB = 1024 * 1024


async def read_at_most(resp: aiohttp.ClientResponse, limit: int, what: str, setting: str = "upstream.max_answer_mb") -> bytes:
    """The whole body of ``resp``, refused once it passes ``limit`` bytes.

    Counted as decoded, not by Content-Length: aiohttp inflates a gzip answer as it
    arrives, so a few MB on the wire can be GBs here. Leaving the rest unread closes
    the connection. Without the bound one search against an archive that sent an
    endless array took 9 GB of memory before the timeout ended it.
    """
    if resp.content_length is not None and resp.content_length > limit and "Content-Encoding" not in resp.headers:
        raise AnswerTooLarge(what, limit, setting)
    held = await _read_past(resp, limit)
    if len(held) > limit:
        raise AnswerTooLarge(what, limit, setting)
    return held


async def read_error_body(resp: aiohttp.ClientResponse) -> bytes:
    """At most `ERROR_BODY_LIMIT` bytes of an error answer: enough to log and parse."""
    return (await _read_past(resp, ERROR_BODY_LIMIT))[:ERROR_BODY_LIMIT]


async def _read_past(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, read until its end or until it holds more than ``limit`` bytes."""
    held = bytearray()
    async for chunk in resp.content.iter_any():
        held += chunk
        if len(held) > limit:
            break
    return bytes(held)


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


def short(body: bytes, limit: int = 200) -> str:
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


@dataclass(frozen=True)
class Body:
    """What a signer may know about a request body without reading it: its length and,
    when it is in memory, its SHA-256 (SigV4 signs the payload hash). A streamed body
    (STOW-RS from spool files) has no hash until it has been sent."""

    length: int | None
    sha256: str | None

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls(len(data), hashlib.sha256(data).hexdigest())

    @classmethod
    def streamed(cls, length: int | None) -> Body:
        return cls(length, None)


NO_BODY = Body(0, EMPTY_SHA256)


@dataclass(frozen=True)
class SignableRequest:
    """One attempt as it will go on the wire: ``url`` is final (query string already
    encoded, sent without re-encoding) and ``headers`` are every header set by us."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: Body


class Signer(Protocol):
    """Headers that authenticate one attempt (``Authorization``, ``X-Amz-Date``...).

    Called anew for every request, retries and Accept fallbacks included, so a signer
    may put a timestamp or a nonce in them. May be a plain or an async callable.
    """

    def __call__(self, request: SignableRequest) -> Mapping[str, str] | Awaitable[Mapping[str, str]]: ...


@runtime_checkable
class RenewableSigner(Protocol):
    """A signer whose credential the archive may stop taking before the signer knows
    (an access token revoked, or expired early by a clock ahead of ours)."""

    def rejected(self, sent: Mapping[str, str]) -> None:
        """The archive answered 401 to the request sent with these headers."""


class StaticHeaders:
    """A `Signer` that adds the same headers to every request (basic, bearer, API key)."""

    def __init__(self, headers: Mapping[str, str]) -> None:
        self.headers = dict(headers)

    def __call__(self, request: SignableRequest) -> Mapping[str, str]:
        return self.headers


def raise_for_status(method: str, url: URL, status: int, body: bytes, headers: Mapping[str, str], what: str) -> None:
    """The one table from HTTP statuses to typed errors; ``what`` names the transaction
    in messages ("search", "retrieve"...). Logs and messages name the path and the
    standard status phrase, never the query string (it may hold patient names), the
    archive's reason phrase or, above DEBUG, its body (either may quote PHI)."""
    if status < 400:
        return
    log.debug("%s %s error body: %s", method, url.path, short(body), extra=PATIENT_DATA)
    if status in (401, 403):
        log.error("%s %s: archive refused our credentials: HTTP %d", method, url.path, status)
        raise UpstreamAuthError(f"archive refused credentials: HTTP {status}", status)
    if status == 404:
        raise NotFound(f"not in the archive: HTTP 404 on {what}")
    if status in RETRYABLE_HTTP or status == DEPENDENCY_FAILED:
        log.warning("%s %s failed: %s", method, url.path, http_status(status))
        raise UpstreamUnavailable(f"archive error: {http_status(status)}", retry_after_seconds(headers.get("Retry-After")), status)
    raise UpstreamRejected(f"archive rejected {what}: {http_status(status)}", status)


def _timeout_message(timeout: aiohttp.ClientTimeout) -> str:
    if timeout.total:
        return f"archive timeout after {timeout.total:g} s"
    if timeout.sock_read:
        return f"archive silent for {timeout.sock_read:g} s"
    return "archive timeout"


class HttpClient:
    """One archive's base URL, session, signer and error mappings."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        connect_timeout: float,
        verify_tls: bool = True,
        session: aiohttp.ClientSession | None = None,
        signer: Signer | None = None,
        metrics: Metrics | None = None,
        max_answer: int = 256 * MIB,
    ) -> None:
        """``metrics``: where each request's duration and status go (None: nowhere);
        ``max_answer``: the bound callers give `read_at_most` (`upstream.max_answer_mb`)."""
        self.metrics = metrics
        self.max_answer = max_answer
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        self.verify_tls = verify_tls
        self.signer = signer
        # (a runtime Protocol check costs ~7 us: once, not per request)
        self._renewable = signer if isinstance(signer, RenewableSigner) else None
        self._session = session
        self._owned = session is None

    async def start(self) -> None:
        """Create the session unless one was injected."""
        if self._session is None:
            ssl_ctx: ssl.SSLContext | bool = True if self.verify_tls else False
            self._session = aiohttp.ClientSession(
                timeout=self.timeout, connector=aiohttp.TCPConnector(limit=64, ssl=ssl_ctx)
            )

    async def close(self) -> None:
        """Close the session if this client created it; an injected one is its owner's."""
        if self._session is not None and self._owned:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("HttpClient used before start()")
        return self._session

    def url(self, path: str = "", query: str = "") -> URL:
        """``base/path?query`` as sent: ``query`` must already be encoded."""
        text = f"{self.base_url}/{path}" if path else self.base_url
        return URL(f"{text}?{query}" if query else text, encoded=True)

    async def _signed(self, method: str, url: URL, headers: dict[str, str], body: Body) -> dict[str, str]:
        if self.signer is None:
            return headers
        extra = self.signer(SignableRequest(method, str(url), dict(headers), body))
        if inspect.isawaitable(extra):
            extra = await extra
        return {**headers, **extra}

    @contextlib.asynccontextmanager
    async def request(
        self,
        method: str,
        url: URL,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        data: Any = None,
        body: Body = NO_BODY,
        timeout: aiohttp.ClientTimeout | None = None,
        passthrough: Container[int] = (),
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """One signed attempt, as a context manager around the response.

        Statuses of 400 and above raise through `raise_for_status` unless listed in
        ``passthrough`` (the caller handles those). Transport failures, also while the
        caller reads the body inside the ``async with`` block, become
        UpstreamUnavailable; so does an OSError of a local file the caller reads or
        writes there (a spool file streamed out, a spill file written).
        """
        effective = timeout or self.timeout
        started = time.monotonic()
        status: int | None = None
        renewable = self._renewable
        # A body in memory (or none) can go again with a renewed credential; a
        # streamed one (STOW-RS from spool files) cannot: its 401 goes to the caller,
        # whose next attempt carries the new credential.
        replays = 1 if renewable is not None and (data is None or isinstance(data, (bytes, str))) else 0
        try:
            while True:
                sent = await self._signed(method, url, dict(headers or {}), body)
                async with self.session.request(
                    method, url, headers=sent, data=data, timeout=effective, proxy=proxy_for(url)
                ) as resp:
                    status = resp.status
                    if status == 401 and renewable is not None:
                        renewable.rejected(sent)
                        if replays:
                            replays -= 1
                            await read_error_body(resp)
                            continue
                    if status >= 400 and status not in passthrough:
                        payload = await read_error_body(resp)
                        raise_for_status(method, url, status, payload, resp.headers, what)
                    yield resp
                    return
        except TimeoutError:  # before OSError: TimeoutError is one
            raise UpstreamUnavailable(_timeout_message(effective)) from None
        except aiohttp.ClientError as exc:  # before OSError: ClientOSError is one
            log.debug("%s %s: %s", method, url.path, exc)
            raise UpstreamUnavailable(f"archive unreachable: {type(exc).__name__}") from None
        except SpillFull:
            raise  # the gateway's disk, not the archive: the caller says so
        except OSError as exc:
            raise UpstreamUnavailable(f"local file error: {exc.strerror or exc}") from None
        finally:
            if self.metrics is not None:
                self.metrics.upstream_request(what, method, status, time.monotonic() - started)
