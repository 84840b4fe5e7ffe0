"""Request authentication for upstream archives (none, basic, bearer, custom header).

Credentials come from the config (possibly from environment variables) and are never
logged. They are applied as a `Signer` of the HTTP plumbing, the same hook a per-request
signature (SigV4) plugs into.
"""

from __future__ import annotations

import base64

from gateway.config import AuthConfig
from gateway.upstream.http import Signer, StaticHeaders


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


def config_signer(auth: AuthConfig) -> Signer:
    """The `Signer` for ``upstream.auth``: the same static headers on every request."""
    return StaticHeaders(auth_headers(auth))
