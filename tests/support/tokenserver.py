"""An OAuth 2.0 token endpoint (RFC 6749 4.4, client credentials), faithful on the wire
to what Microsoft Entra ID and Keycloak answer, for the gateway's ``oauth2`` upstream.

No identity provider can run here, so this is the one fake of those tests; what checks
its tokens is real: HAProxy verifying each JWT's HS256 signature, audience and expiry
in front of a real Orthanc (`tests.support.haproxy.jwt_config`). It takes the client's
credentials by HTTP Basic (form-encoded, RFC 6749 2.3.1) or in the form, checks the
grant type and scope, answers RFC 6749 5.2 errors, and records every request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote_plus, urlsplit

from tests.support.jsonserver import Answer, JsonServer

JWT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hs256_jwt(claims: dict[str, object], secret: str) -> str:
    """A compact JWS signed with HMAC-SHA256, as an identity provider issues."""
    head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64url(signature)}"


@dataclass(frozen=True)
class TokenRequest:
    """What one request to the endpoint carried, for the tests' assertions."""

    client_auth: str  # "basic" | "post" | "assertion" | "none"
    client_id: str
    form: dict[str, str]
    status: int


class TokenServer(JsonServer):
    """``TokenServer(client_id, secret, scope=..., audience=...).start()``; ``.token_url``.

    ``assertion``: the client assertion (a Kubernetes service account token) that
    authenticates the client instead of its secret. ``lifetime``: the ``expires_in`` it announces; ``valid_for``: how long the token's
    ``exp`` claim really lets it live (shorter than ``lifetime``: an archive whose
    clock runs ahead, or a token revoked early). ``status``: answer every request with
    that HTTP status instead (503: the provider down).
    """

    def __init__(
        self,
        client_id: str,
        client_secret: str,
        *,
        scope: str = "",
        audience: str = "https://archive.example",
        signing_secret: str = "haproxy-verifies-this",
        lifetime: int = 3600,
        valid_for: int | None = None,
        expires_in_as_string: bool = False,
        assertion: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.scope = scope
        self.audience = audience
        self.signing_secret = signing_secret
        self.lifetime = lifetime
        self.valid_for = valid_for
        self.expires_in_as_string = expires_in_as_string
        self.assertion = assertion
        self.status: int | None = None
        self.delay = 0.0  # seconds each answer takes
        self.requests: list[TokenRequest] = []
        self.issued = 0
        super().__init__()

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tenant/oauth2/v2.0/token"

    def post(self, path: str, headers: dict[str, str], body: bytes) -> Answer:
        status, answer = self.answer(headers, body)
        extra = {"Cache-Control": "no-store"}
        if status == 401:
            extra["WWW-Authenticate"] = 'Basic realm="token"'
        return status, answer, extra

    def answer(self, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, object]]:
        time.sleep(self.delay)
        form = {k: v[0] for k, v in parse_qs(raw.decode("ascii"), keep_blank_values=True).items()}
        client_auth, client_id, secret = "none", "", ""
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("basic "):
            pair = base64.b64decode(authorization[6:]).decode()
            user, _, password = pair.partition(":")
            client_auth, client_id, secret = "basic", unquote_plus(user), unquote_plus(password)
        if "client_secret" in form:
            if client_auth == "basic":  # RFC 6749 2.3: one method per request
                return self._record("both", client_id, form, 400, "invalid_request", "two client authentication methods")
            client_auth, client_id, secret = "post", form.get("client_id", ""), form["client_secret"]
        if "client_assertion" in form:  # RFC 7521 4.2, as AKS workload identity sends it
            client_auth, client_id = "assertion", form.get("client_id", "")
            secret = form["client_assertion"] if form.get("client_assertion_type") == JWT_ASSERTION else ""
        if self.status is not None:
            return self._record(client_auth, client_id, form, self.status, "temporarily_unavailable", "scripted outage")
        if not headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            return self._record(client_auth, client_id, form, 400, "invalid_request", "expected a form")
        if form.get("grant_type") != "client_credentials":
            return self._record(client_auth, client_id, form, 400, "unsupported_grant_type", form.get("grant_type", ""))
        expected = self.assertion if client_auth == "assertion" else self.client_secret
        if client_id != self.client_id or not expected or not hmac.compare_digest(secret, expected):
            return self._record(client_auth, client_id, form, 401, "invalid_client", "AADSTS7000215: Invalid client secret provided.")
        if self.scope and form.get("scope") != self.scope:
            return self._record(client_auth, client_id, form, 400, "invalid_scope", f"scope {form.get('scope', '')!r} is not valid")
        now = int(time.time())
        self.issued += 1
        claims = {
            "aud": self.audience,
            "iat": now,
            "exp": now + (self.valid_for if self.valid_for is not None else self.lifetime),
            "sub": client_id,
            "jti": str(self.issued),
        }
        self.requests.append(TokenRequest(client_auth, client_id, form, 200))
        expires = str(self.lifetime) if self.expires_in_as_string else self.lifetime
        return 200, {
            "token_type": "Bearer",
            "expires_in": expires,
            "ext_expires_in": expires,
            "access_token": hs256_jwt(claims, self.signing_secret),
        }

    def _record(
        self, client_auth: str, client_id: str, form: dict[str, str], status: int, error: str, detail: str
    ) -> tuple[int, dict[str, object]]:
        self.requests.append(TokenRequest(client_auth, client_id, form, status))
        return status, {"error": error, "error_description": detail}


class AzureIdentity(JsonServer):
    """Azure's managed identity endpoints, faithful on the wire: a VM's Instance
    Metadata Service (``GET /metadata/identity/oauth2/token`` with ``Metadata: true``,
    API 2018-02-01, ``expires_in`` as a string) and App Service's (``IDENTITY_ENDPOINT``
    with the ``X-IDENTITY-HEADER`` secret, API 2019-08-01, only ``expires_on``).

    ``client_id``: the user-assigned identity the machine has besides its
    system-assigned one (None: none). Tokens are HS256 JWTs for ``resource``, what HAProxy checks.
    """

    def __init__(
        self,
        resource: str,
        *,
        client_id: str | None = None,
        identity_header: str = "app-service-secret-7b3f",
        signing_secret: str = "haproxy-verifies-this",
        lifetime: int = 86399,
    ) -> None:
        self.resource = resource
        self.client_id = client_id
        self.identity_header = identity_header
        self.signing_secret = signing_secret
        self.lifetime = lifetime
        self.requests: list[tuple[str, int, str]] = []  # (endpoint, status, error)
        super().__init__()

    @property
    def imds_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metadata/identity/oauth2/token"

    @property
    def app_service_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/msi/token"

    def get(self, path: str, headers: dict[str, str]) -> Answer:
        status, answer = self.answer(path, headers)
        return status, answer, {}

    def answer(self, path: str, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
        url = urlsplit(path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path == "/metadata/identity/oauth2/token":
            endpoint, api = "imds", "2018-02-01"
            if headers.get("metadata") != "true":
                return self._refuse(endpoint, 400, "invalid_request", "Required metadata header not specified")
        elif url.path == "/msi/token":
            endpoint, api = "app_service", "2019-08-01"
            if headers.get("x-identity-header") != self.identity_header:
                return self._refuse(endpoint, 401, "unauthorized", "X-IDENTITY-HEADER missing or wrong")
        else:
            return self._refuse("none", 404, "not_found", url.path)
        if query.get("api-version") != api:
            return self._refuse(endpoint, 400, "invalid_request", f"api-version {query.get('api-version')} not supported")
        asked = query.get("client_id")
        if asked is not None and asked != self.client_id:
            return self._refuse(endpoint, 400, "invalid_request", "Identity not found")
        if query.get("resource") != self.resource:
            return self._refuse(endpoint, 400, "invalid_resource", f"AADSTS500011: resource {query.get('resource')} not found")
        now = int(time.time())
        claims = {"aud": self.resource, "iat": now, "exp": now + self.lifetime, "sub": asked or "system-assigned"}
        token = hs256_jwt(claims, self.signing_secret)
        self.requests.append((endpoint, 200, ""))
        answer: dict[str, object] = {
            "access_token": token, "expires_on": str(now + self.lifetime), "resource": self.resource, "token_type": "Bearer",
        }
        if endpoint == "imds":
            answer |= {"expires_in": str(self.lifetime), "not_before": str(now), "refresh_token": ""}
        return 200, answer

    def _refuse(self, endpoint: str, status: int, error: str, detail: str) -> tuple[int, dict[str, object]]:
        self.requests.append((endpoint, status, error))
        return status, {"error": error, "error_description": detail}
