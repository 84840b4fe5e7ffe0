"""Who may call the facade (``[http.auth]``) and which browser origins may (``cors_origins``).

One middleware does both, because a CORS preflight carries no credentials: it must be
answered before authentication, and every answer, a 401 included, needs the CORS
headers or the browser hides it from the page. ``/healthz`` and ``/readyz`` stay open for
monitoring probes; ``/metrics`` needs credentials like the facade.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.config import HttpAuthConfig

log = logging.getLogger("gateway.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes; /metrics needs credentials
CORS_METHODS = "GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_HEADERS = "Authorization, Accept, Content-Type, If-None-Match, X-Requested-With"
EXPOSED_HEADERS = "Content-Type, Content-Length, Content-Location, Warning, Retry-After, ETag"


def _equal(given: str, wanted: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "replace"), wanted.encode("utf-8", "replace"))


def admitted(request: web.Request, auth: HttpAuthConfig) -> bool:
    """Whether the request carries one of the configured credentials (or none are)."""
    if auth.open:
        return True
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value and any(_equal(value, t) for t in auth.bearer_tokens):
        return True
    if scheme.lower() == "basic" and value and auth.basic_users:
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if sep and any(_equal(user, u) and _equal(password, p) for u, p in auth.basic_users):
            return True
    key = request.headers.get(auth.api_key_header) if auth.api_keys else None
    return key is not None and any(_equal(key.strip(), k) for k in auth.api_keys)


def _challenge(auth: HttpAuthConfig) -> str:
    """WWW-Authenticate: the schemes a client may use (RFC 9110 11.6.1)."""
    schemes = []
    if auth.bearer_tokens:
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


def install(app: web.Application, auth: HttpAuthConfig, origins: tuple[str, ...]) -> None:
    """Enforce ``auth`` on every route but the probes and answer CORS for ``origins``.

    CORS headers go on in ``on_response_prepare``, so streamed answers (which send
    their headers from inside the handler) and errors get them alike.
    """

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
        if request.path not in OPEN_PATHS and not admitted(request, auth):
            log.warning("HTTP %s %s from %s: 401, no valid credentials", request.method, request.path, request.remote)
            return web.Response(status=401, text="authentication required\n", headers={"WWW-Authenticate": _challenge(auth)})
        return await handler(request)

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        headers = _cors(request, origins)
        vary = response.headers.get("Vary")
        if vary and "Vary" in headers:  # keep what the handler varies on (Accept)
            headers["Vary"] = f"{vary}, {headers['Vary']}"
        response.headers.update(headers)

    app.middlewares.append(guard)
    app.on_response_prepare.append(add_cors)
