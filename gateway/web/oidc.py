"""Access tokens of an OpenID Connect provider as the facade's credentials.

A viewer whose users sign in with the hospital's provider (Keycloak, Microsoft Entra ID,
Okta; OHIF's ``oidc`` setting) sends the provider's access token as ``Authorization:
Bearer``. The facade checks it as any resource server does: a signature by a key the
provider publishes (its JWKS, found through its discovery document unless named), the
issuer, an audience the facade was given, expiry and not-before (60 s of clock skew
allowed), and the scopes the config requires. Keys are fetched at the first token and
again when a token names a key not yet known (the provider rotated), at most once a
minute, so a flood of forged key IDs cannot make the gateway hammer the provider.

Only asymmetric algorithms are accepted: with HS256 a published public key would
become a shared secret anyone could sign with, and ``none`` signs nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from gateway.config import OidcConfig
from gateway.upstream.errors import AnswerTooLarge
from gateway.upstream.http import read_at_most
from gateway.upstream.proxy import proxy_for

if TYPE_CHECKING:
    import jwt

log = logging.getLogger("gateway.web")

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
LEEWAY = 60.0  # seconds of clock skew between the provider and the gateway
REFETCH_AFTER = 60.0  # seconds before an unknown key ID may fetch the keys again
RETRY_FAILED_AFTER = 5.0  # ... after a fetch that failed (meanwhile: 503 at once)
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)
# A discovery document or key set is a few KB.
DOCUMENT_LIMIT = 1024 * 1024
ADMITTED_KEPT = 1024  # tokens remembered as admitted (the oldest forgotten first)


@dataclass(frozen=True)
class Admission:
    """A valid token: whom it names and the permissions it grants."""

    user: str
    scopes: frozenset[str]


class KeysUnavailable(Exception):
    """The provider's keys cannot be had now: tokens cannot be checked either way
    (the facade answers 503, not 401, so clients do not drop a good token)."""


class TokenVerifier:
    """Checks access tokens against one provider; ``clock`` is wall time (tests)."""

    def __init__(self, cfg: OidcConfig, *, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self.verify_tls = cfg.verify_tls
        self.clock = clock
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched_at = -math.inf
        self._failure: str | None = None  # why the last fetch failed
        self._admitted: dict[str, tuple[Admission, float]] = {}  # token -> (admission, until when)
        self._lock = asyncio.Lock()

    async def admit(self, token: str) -> Admission | None:
        """Who the token names (``username_claim``, else ``sub``) and what it grants,
        None when it is not a valid token for the facade (the reason logged). Raises
        KeysUnavailable.

        A token admitted once is remembered until it expires: a viewer sends the same
        token with each of a series' hundreds of frame requests, and checking its
        signature costs about 0.1 ms each time."""
        known = self._admitted.get(token)
        if known is not None and self.clock() < known[1]:
            return known[0]
        import jwt  # here, not at the top: PyJWT (with cryptography) is 0.1 s of every start, needed only with a provider

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return None  # not a JWT: perhaps a static bearer token that did not match
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALGORITHMS:
            log.warning("access token refused: algorithm %r is not accepted", algorithm)
            return None
        if kid is not None and not isinstance(kid, str):
            log.warning("access token refused: its key ID is not a string")
            return None
        key = await self._key(kid)
        if key is None:
            log.warning("access token refused: signed with a key the provider does not publish (kid %r)", kid)
            return None
        try:
            claims = jwt.decode(
                token, key.key, algorithms=[algorithm], audience=list(self.cfg.audience), issuer=self.cfg.issuer,
                leeway=LEEWAY, options={"require": ["exp", "iss", "aud"]},
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:  # PyJWTError: also a key of another type than alg
            log.warning("access token refused: %s", exc or type(exc).__name__)
            return None
        granted = _scopes(claims)
        missing = [s for s in self.cfg.required_scopes if s not in granted]
        if missing:
            log.warning("access token refused: scope %s missing", " ".join(missing))
            return None
        name = claims.get(self.cfg.username_claim) or claims.get("sub")
        admission = Admission(str(name) if name else "unnamed", frozenset(granted))
        if len(self._admitted) >= ADMITTED_KEPT:
            del self._admitted[next(iter(self._admitted))]  # the oldest
        self._admitted[token] = (admission, float(claims["exp"]) + LEEWAY)
        return admission

    async def user(self, token: str) -> str | None:
        """`admit`'s user alone."""
        admission = await self.admit(token)
        return admission.user if admission is not None else None

    def may_write(self, admission: Admission) -> bool:
        """Whether the token grants every one of ``write_scopes`` (STOW-RS, PUT, DELETE)."""
        return all(scope in admission.scopes for scope in self.cfg.write_scopes)

    async def signing_keys(self) -> int:
        """How many signing keys the provider publishes now (``check-config
        --online``); raises KeysUnavailable."""
        return len(await self._fetch())

    def _known(self, kid: str | None) -> jwt.PyJWK | None:
        """The key with this ID; without an ID, the provider's only key if it has one."""
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _key(self, kid: str | None) -> jwt.PyJWK | None:
        """`_known`, fetching the keys first when it is not (at most once a minute,
        every 5 s after a failed fetch, meanwhile raising that failure again)."""
        if (key := self._known(kid)) is not None:
            return key
        async with self._lock:
            if self._known(kid) is None:
                wait = REFETCH_AFTER if self._failure is None else RETRY_FAILED_AFTER
                if self.clock() - self._fetched_at < wait:
                    if self._failure is not None:
                        raise KeysUnavailable(self._failure)
                else:
                    self._fetched_at = self.clock()
                    try:
                        self._keys = await self._fetch()
                        self._failure = None
                    except KeysUnavailable as exc:
                        self._failure = str(exc)
                        raise
        return self._known(kid)

    async def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        """The provider's signing keys by key ID; raises KeysUnavailable."""
        import jwt  # see `admit`

        try:
            async with aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as session:
                jwks_uri = self.cfg.jwks_uri or await self._discovered_jwks_uri(session)
                keys = jwt.PyJWKSet.from_dict(dict(await _get_json(session, jwks_uri, self.verify_tls)))
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError, jwt.PyJWKSetError, AnswerTooLarge) as exc:
            log.error("cannot fetch the OpenID provider's keys: %s", _describe(exc))
            raise KeysUnavailable(_describe(exc)) from None
        usable = {k.key_id: k for k in keys.keys if k.public_key_use in (None, "sig")}
        log.info("OpenID provider keys fetched: %d", len(usable))
        return usable

    async def _discovered_jwks_uri(self, session: aiohttp.ClientSession) -> str:
        """``jwks_uri`` from ``{issuer}/.well-known/openid-configuration``, which must
        name the same issuer (OpenID Connect Discovery 1.0, 4.3)."""
        document = await _get_json(session, f"{self.cfg.issuer}/.well-known/openid-configuration", self.verify_tls)
        if str(document.get("issuer", "")).rstrip("/") != self.cfg.issuer:
            raise ValueError(f"the discovery document names issuer {document.get('issuer')!r}")
        uri = document.get("jwks_uri")
        if not isinstance(uri, str) or not uri:
            raise ValueError("the discovery document has no jwks_uri")
        return uri


async def _get_json(session: aiohttp.ClientSession, url: str, verify_tls: bool) -> Mapping[str, Any]:
    async with session.get(
        url, headers={"Accept": "application/json"}, ssl=verify_tls, proxy=proxy_for(URL(url))
    ) as resp:
        if resp.status != 200:
            raise ValueError(f"{url}: HTTP {resp.status}")
        document = json.loads(await read_at_most(resp, DOCUMENT_LIMIT, url, setting=""))
    if not isinstance(document, dict):
        raise ValueError(f"{url}: not a JSON object")
    return document


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    """Granted permissions: ``scope`` (RFC 9068, space-separated), Entra ID's ``scp``
    (delegated) and ``roles`` (an application's own permissions)."""
    granted: set[str] = set()
    for key in ("scope", "scp", "roles"):
        value = claims.get(key)
        if isinstance(value, str):
            granted.update(value.split())
        elif isinstance(value, list):
            granted.update(str(v) for v in value)
    return granted


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
