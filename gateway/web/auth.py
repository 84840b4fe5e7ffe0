"""Who may call the facade (``[http.auth]``: static secrets, or an OpenID provider's
access tokens) and which browser origins may (``cors_origins``).

One middleware does both, because a CORS preflight carries no credentials: it must be
answered before authentication, and every answer, a 401 included, needs the CORS
headers or the browser hides it from the page. ``/healthz`` and ``/readyz`` stay open for
monitoring probes; ``/metrics`` needs credentials like the facade. An address that
keeps presenting wrong credentials is turned away for a minute (`gateway.web.lockout`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.audit.auditor import web_participant
from gateway.audit.message import Participant
from gateway.config import HttpAuthConfig
from gateway.metrics import Metrics
from gateway.web.keys import ADMISSION, AUDIT, USER
from gateway.lockout import FailedLogins
from gateway.log_throttle import Throttle, left_out
from gateway.web.oidc import KeysUnavailable, TokenVerifier

log = logging.getLogger("gateway.web")
# A viewer left without its token asks hundreds of frames a second, each a 401: the
# audit trail records every one; the log says the first few of each minute and counts the rest.
_REFUSED = Throttle()

OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes; /metrics needs credentials
WRITE_METHODS = frozenset({"POST", "PUT", "DELETE"})  # STOW-RS, Azure's PUT, DELETE
READ_METHODS = "GET, HEAD, OPTIONS"
CORS_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Accept, Content-Type, If-None-Match, X-Requested-With"
EXPOSED_HEADERS = "Content-Type, Content-Length, Content-Location, Content-Range, Accept-Ranges, Warning, Retry-After, ETag"


def _equal(given: str, wanted: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), wanted.encode("utf-8", "replace"))


def _first(given: str, secrets: tuple[str, ...]) -> int | None:
    """The 1-based position of the secret ``given`` matches (each compared in full)."""
    matches = [i for i, secret in enumerate(secrets, 1) if _equal(given, secret)]
    return matches[0] if matches else None


async def admitted(request: web.Request, auth: HttpAuthConfig, verifier: TokenVerifier | None = None) -> str | None:
    """Who the request's credentials say it is, None when they match none: a Basic
    user's name, ``bearer token N`` or ``api key N`` (the Nth configured, never the
    secret), ``oidc <user>`` for a provider's access token, ``anonymous`` when the
    facade is open. The audit trail records it. Raises KeysUnavailable."""
    if auth.open:
        return "anonymous"
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value and (n := _first(value, auth.bearer_tokens)) is not None:
        return f"bearer token {n}"
    if scheme.lower() == "bearer" and value and verifier is not None and (admission := await verifier.admit(value)):
        request[ADMISSION] = admission
        return f"oidc {admission.user}"
    if scheme.lower() == "basic" and value and auth.basic_users:
        user, sep, password = _basic(value)
        if sep and any(_equal(user, u) and _equal(password, p) for u, p in auth.basic_users):
            return user
    key = request.headers.get(auth.api_key_header) if auth.api_keys else None
    if key is not None and (n := _first(key.strip(), auth.api_keys)) is not None:
        return f"api key {n}"
    return None


def _basic(value: str) -> tuple[str, str, str]:
    """(user, ":", password) of a Basic credential; empty parts when it is not one."""
    try:
        return base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return "", "", ""


def requester(request: web.Request) -> Participant:
    """Who is asking, as the audit trail names a facade client: the credential that
    admitted the request (`admitted`), from its address."""
    return web_participant(request[USER], request.remote)


def offered_user(request: web.Request) -> str:
    """Whom refused credentials claimed to be, for the audit trail: a Basic user name,
    else the scheme offered (never a secret)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic":
        user, sep, _ = _basic(value.strip())
        return f"basic user {user}" if sep else "malformed basic credentials"
    return f"{scheme.lower()} credentials" if scheme else "no credentials"


def _presents_credentials(request: web.Request, auth: HttpAuthConfig) -> bool:
    """Whether the request offered credentials at all (only those count as failures)."""
    return "Authorization" in request.headers or bool(auth.api_keys and auth.api_key_header in request.headers)


def _challenge(auth: HttpAuthConfig) -> str:
    """WWW-Authenticate: the schemes a client may use (RFC 9110 11.6.1)."""
    schemes = []
    if auth.bearer_tokens or auth.oidc:
        schemes.append('Bearer realm="dicom-gateway"')
    if auth.basic_users:
        schemes.append('Basic realm="dicom-gateway", charset="UTF-8"')
    if auth.api_keys:
        schemes.append(f'ApiKey realm="dicom-gateway", header="{auth.api_key_header}"')
    return ", ".join(schemes)


def _allowed_origin(origin: str | None, origins: tuple[str, ...]) -> str | None:
    if not origin or not origins:
        return None
    if "*" in origins:
        return origin  # echoed, not "*": a request with Authorization may not use "*"
    return origin if origin in origins else None


def _cors(request: web.Request, origins: tuple[str, ...]) -> dict[str, str]:
    origin = _allowed_origin(request.headers.get("Origin"), origins)
    if origin is None:
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        "Vary": "Origin",
    }


def install(
    app: web.Application, auth: HttpAuthConfig, origins: tuple[str, ...], read_only: bool = False, metrics: Metrics | None = None
) -> None:
    """Enforce ``auth`` on every route but the probes and answer CORS for ``origins``;
    with ``read_only``, refuse what would store or delete (405) whoever asks.

    CORS headers go on in ``on_response_prepare``, so streamed answers (which send
    their headers from inside the handler) and errors get them alike.
    """
    verifier = TokenVerifier(auth.oidc) if auth.oidc is not None else None
    failures = FailedLogins(auth.max_failures_per_minute)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not _cors(request, origins):
                return web.Response(status=403, text="origin not allowed\n")
            asked = request.headers.get("Access-Control-Request-Headers", "")
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": asked or CORS_HEADERS,
                    "Access-Control-Max-Age": "600",
                },
            )
        if request.path in OPEN_PATHS:
            return await handler(request)
        address = request.remote or "?"
        wait = failures.blocked_for(address)
        if wait > 0:
            return web.Response(
                status=429, text="too many failed authentications from this address; try again later\n",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        try:
            user = await admitted(request, auth, verifier)
        except KeysUnavailable as exc:
            log.warning("HTTP %s %s from %s: 503, cannot check the access token: %s", request.method, request.path, request.remote, exc)
            return web.Response(
                status=503, text="cannot check access tokens now: the OpenID provider's keys are unavailable\n",
                headers={"Retry-After": "5"},
            )
        if user is None:
            said, held = _REFUSED.admit()
            if said:
                log.warning("HTTP %s %s from %s: 401, no valid credentials%s", request.method, request.path, request.remote, left_out(held))
            request.app[AUDIT].refused_login(
                web_participant(offered_user(request), request.remote), f"HTTP {request.method} {request.path}: 401"
            )
            if _presents_credentials(request, auth) and failures.failed(address):
                if metrics is not None:
                    metrics.auth_lockouts.inc()
                log.warning(
                    "%s: %d failed authentications within a minute; its requests are refused (429) for a minute",
                    address, auth.max_failures_per_minute,
                )
            return web.Response(status=401, text="authentication required\n", headers={"WWW-Authenticate": _challenge(auth)})
        request[USER] = user
        if read_only and request.method in WRITE_METHODS:
            log.warning("HTTP %s %s from %s (%s): 405, the facade is read-only", request.method, request.path, request.remote, user)
            return web.Response(status=405, text="this DICOMweb service is read-only (http.read_only)\n", headers={"Allow": READ_METHODS})
        admission = request.get(ADMISSION)
        if request.method in WRITE_METHODS and admission is not None and verifier is not None and not verifier.may_write(admission):
            log.warning("HTTP %s %s from %s (%s): 403, the token lacks a write scope", request.method, request.path, request.remote, user)
            request.app[AUDIT].refused_login(web_participant(user, request.remote), f"HTTP {request.method} {request.path}: 403")
            scopes = " ".join(auth.oidc.write_scopes) if auth.oidc is not None else ""
            return web.Response(
                status=403, text=f"this token may read, not store or delete (scope {scopes} needed)\n",
                headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scopes}"'},
            )
        return await handler(request)

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        headers = _cors(request, origins)
        vary = response.headers.get("Vary")
        if vary and "Vary" in headers:  # keep what the handler varies on (Accept)
            headers["Vary"] = f"{vary}, {headers['Vary']}"
        response.headers.update(headers)

    app.middlewares.append(guard)
    app.on_response_prepare.append(add_cors)
