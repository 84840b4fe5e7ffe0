"""OAuth 2.0 client credentials (RFC 6749 4.4) for archives behind an identity provider.

Azure's DICOM service takes only Microsoft Entra ID access tokens, a dcm4chee secured
by Keycloak takes Keycloak's; both live about an hour, so a static ``bearer`` token
stops delivery by the next morning. This signer asks the token endpoint for one with
the gateway's client ID and secret, keeps it, asks again before it expires (one request
however many wait for it), and forgets it when the archive answers 401 to it, so the
next attempt carries a fresh one.

Failures are typed like the archive's own: a refusal by the token endpoint (wrong
secret, unknown client or scope) is an UpstreamAuthError, which holds delivery instead
of using up the instances' attempts; an endpoint down or slow is UpstreamUnavailable,
retried like an archive down. While the endpoint is down, a token not yet expired is
still used. Secrets are never logged; the endpoint's own ``error`` and
``error_description`` are (they name the problem, never the secret).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import aiohttp
from yarl import URL

from gateway.config import AuthConfig
from gateway.upstream.errors import AnswerTooLarge, UpstreamAuthError, UpstreamUnavailable
from gateway.upstream.http import RETRYABLE_HTTP, SignableRequest, http_status, read_at_most, retry_after_seconds
from gateway.upstream.proxy import proxy_for

log = logging.getLogger("gateway.upstream")

# A token is renewed this long before it expires, or at half its life if that is
# sooner, so requests in flight never carry one that lapses on the way.
RENEW_BEFORE = 300.0
# When the endpoint does not say (``expires_in`` is only RECOMMENDED by RFC 6749).
ASSUMED_LIFETIME = 300.0
# A token this close to its expiry is not used even while the endpoint is down.
EXPIRY_MARGIN = 5.0
# Seconds between renewal attempts while the endpoint fails and the token still serves.
RENEW_RETRY = 30
TOKEN_TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)
# A token answer is a few KB; an identity provider's error page rarely more.
TOKEN_ANSWER_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Token:
    value: str
    renew_at: float  # on the signer's clock
    expires_at: float


def _client_basic(client_id: str, secret: str) -> str:
    """RFC 6749 2.3.1: both form-encoded before they are joined, then Base64."""
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _usable(token: Token, now: float) -> bool:
    """Still valid for long enough to be sent."""
    return now < token.expires_at - EXPIRY_MARGIN


def _one_line(text: Any, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


class TokenSigner:
    """A `Signer` adding ``Authorization: Bearer <token>`` with a token it obtains
    itself (`_fetch`, per identity provider) and keeps until it is due for renewal.

    ``clock`` is monotonic seconds (tests move it); ``source`` names the provider in
    log lines.
    """

    def __init__(self, source: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.source = source
        self.clock = clock
        self._token: Token | None = None
        self._lock = asyncio.Lock()
        self._retry_at = -math.inf  # after a failed renewal, when to try again

    async def __call__(self, request: SignableRequest) -> Mapping[str, str]:
        return {"Authorization": f"Bearer {await self.token()}", **self._headers()}

    def _headers(self) -> Mapping[str, str]:
        """More headers a provider's tokens need beside Authorization."""
        return {}

    async def _fetch(self) -> Token:
        """A new token; raises UpstreamAuthError (refused) or UpstreamUnavailable."""
        raise NotImplementedError

    def rejected(self, sent: Mapping[str, str]) -> None:
        """The archive answered 401 to a request that carried ``sent`` headers: forget
        that token (revoked, or the clocks disagree on its expiry). A token fetched
        since, by a concurrent request, is kept."""
        current = self._token
        if current is not None and sent.get("Authorization") == f"Bearer {current.value}":
            log.warning("archive refused the access token from %s; asking for a new one", self.source)
            self._token = None

    async def token(self) -> str:
        """A token valid for a while yet; raises UpstreamAuthError or UpstreamUnavailable.

        While a renewal is under way, or waiting after one that failed, a token that
        is still valid serves other requests at once rather than holding them behind
        a provider that may take its whole timeout to fail."""
        held, now = self._token, self.clock()
        if held is not None and (now < held.renew_at or (_usable(held, now) and (self._lock.locked() or now < self._retry_at))):
            return held.value
        async with self._lock:
            held = self._token
            if held is not None and self.clock() < held.renew_at:
                return held.value  # renewed by the request this one waited for
            try:
                self._token = await self._fetch()
            except UpstreamUnavailable as exc:
                if held is not None and _usable(held, self.clock()):
                    self._retry_at = self.clock() + RENEW_RETRY
                    log.warning("%s: %s; the current token is still valid, renewal again in %d s", self.source, exc, RENEW_RETRY)
                    return held.value
                raise
            return self._token.value

    def _token_for(self, value: str, asked: float, lifetime: float) -> Token:
        """The token asked at ``asked`` on the clock, living ``lifetime`` seconds."""
        log.info("access token obtained from %s, valid %d s", self.source, lifetime)
        return Token(value, asked + lifetime - min(RENEW_BEFORE, lifetime / 2), asked + lifetime)


class TokenEndpoint(TokenSigner):
    """A provider answering one HTTP request with RFC 6749 5.1's token (or 5.2's
    error) in JSON: an OAuth 2.0 token endpoint, Azure's managed identity endpoint.
    ``verify_tls`` is the upstream's setting, so a lab's self-signed identity provider
    works like its archive does; ``refused`` says what a refusal refused."""

    refused = "refused the gateway's client credentials"

    def __init__(self, url: str, source: str, verify_tls: bool, clock: Callable[[], float]) -> None:
        super().__init__(source, clock)
        self.url = URL(url)
        self.verify_tls = verify_tls

    def _request(self) -> tuple[str, dict[str, str] | None, dict[str, str]]:
        """The method, form (None: no body) and headers of one token request."""
        raise NotImplementedError

    async def _fetch(self) -> Token:
        method, form, headers = self._request()
        asked = self.clock()
        try:
            async with aiohttp.ClientSession(timeout=TOKEN_TIMEOUT) as session:
                async with session.request(
                    method, self.url, data=form, headers=headers, ssl=self.verify_tls,
                    proxy=proxy_for(self.url),
                ) as resp:
                    status = resp.status
                    body = await read_at_most(resp, TOKEN_ANSWER_LIMIT, "token endpoint's", setting="")
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        except TimeoutError:
            raise UpstreamUnavailable(f"{self.source}: no answer in {TOKEN_TIMEOUT.total:g} s") from None
        except AnswerTooLarge as exc:  # a broken provider or proxy: held like an outage
            raise UpstreamUnavailable(f"{self.source}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(f"{self.source} unreachable: {type(exc).__name__}") from None
        if status in RETRYABLE_HTTP:
            raise UpstreamUnavailable(f"{self.source}: {http_status(status)}", retry_after, status)
        answer = _json_object(body)
        token = answer.get("access_token")
        if status >= 400 or not isinstance(token, str) or not token:
            raise self._refusal(status, answer)
        kind = answer.get("token_type", "Bearer")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise UpstreamAuthError(f"{self.source} issued a {_one_line(kind, 40)!r} token; only Bearer is supported")
        return self._token_for(token, asked, _lifetime(answer))

    def _refusal(self, status: int, answer: Mapping[str, Any]) -> UpstreamAuthError:
        """RFC 6749 5.2's error answer in words an admin can act on."""
        error = _one_line(answer.get("error", ""), 60)
        detail = _one_line(answer.get("error_description", ""))
        what = f"{error}: {detail}" if error and detail else error or detail or "no access_token in the answer"
        message = f"{self.source} {self.refused} ({http_status(status)}, {what}); check upstream.auth"
        log.error("%s", message)
        return UpstreamAuthError(message, status if status >= 400 else 401)


class ClientCredentials(TokenEndpoint):
    """Tokens from ``auth.token_url`` by the client credentials grant."""

    def __init__(
        self, auth: AuthConfig, *, verify_tls: bool = True, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(auth.token_url, f"token endpoint {URL(auth.token_url).host}", verify_tls, clock)
        self.auth = auth

    def _request(self) -> tuple[str, dict[str, str] | None, dict[str, str]]:
        form = {"grant_type": "client_credentials"}
        if self.auth.scope:
            form["scope"] = self.auth.scope
        form.update(self.auth.params)
        headers = {"Accept": "application/json"}
        if self.auth.client_auth == "post":
            form["client_id"] = self.auth.client_id
            form["client_secret"] = self.auth.client_secret
        else:
            headers["Authorization"] = _client_basic(self.auth.client_id, self.auth.client_secret)
        return "POST", form, headers


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return answer if isinstance(answer, dict) else {}


def _lifetime(answer: Mapping[str, Any]) -> float:
    """Seconds the token lives: ``expires_in`` (a string from some providers, Entra's
    v1 among them), else ``expires_on`` in seconds since the epoch (Azure App Service's
    managed identity sends only that), else `ASSUMED_LIFETIME`."""
    for key, since in (("expires_in", 0.0), ("expires_on", time.time())):
        try:
            seconds = float(answer[key]) - since
        except (KeyError, TypeError, ValueError):
            continue
        if seconds > 0:
            return seconds
    return ASSUMED_LIFETIME
