"""Request authentication for upstream archives (none, basic, bearer, custom header,
OAuth 2.0 client credentials, Azure managed identities, Google credentials).

Credentials come from the config (possibly from environment variables) and are never
logged. They are applied as a `Signer` of the HTTP plumbing, the same hook a per-request
signature (SigV4) plugs into.
"""

from __future__ import annotations

import base64

from gateway.config import AuthConfig
from gateway.upstream.azure import azure_identity
from gateway.upstream.http import Signer, StaticHeaders
from gateway.upstream.oauth import ClientCredentials


def auth_headers(auth: AuthConfig) -> dict[str, str]:
    """Static headers that authenticate every request to the archive."""
    if auth.type == "basic":
        token = base64.b64encode(f"{auth.username}:{auth.password}".encode()).decode("ascii")
        return {"Authorization": f"Basic {token}"}
    if auth.type == "bearer":
        return {"Authorization": f"Bearer {auth.token}"}
    if auth.type == "header":
        return {auth.name: auth.value}
    return {}


def config_signer(auth: AuthConfig, verify_tls: bool = True) -> Signer:
    """The `Signer` for ``upstream.auth``: tokens from the identity provider for
    ``oauth2``, else the same static headers on every request."""
    if auth.type == "oauth2":
        return ClientCredentials(auth, verify_tls=verify_tls)
    if auth.type == "azure_managed_identity":
        return azure_identity(auth)
    if auth.type == "google":
        from gateway.upstream.google import GoogleCredentials  # google-auth only when used

        return GoogleCredentials(auth.service_account_file)
    return StaticHeaders(auth_headers(auth))
