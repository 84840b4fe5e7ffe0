"""An OpenID Connect provider's published side, faithful on the wire to Keycloak's: the
discovery document at ``{issuer}/.well-known/openid-configuration`` and the signing keys
(JWKS) it names, plus access tokens signed with those keys (RS256, as Keycloak and
Entra ID sign them). No provider runs here; this is the fake, the verifier is the
gateway's. Keys can be rotated and the provider taken down.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.jsonserver import Answer, JsonServer


class OidcProvider(JsonServer):
    """``OidcProvider(audience="dicom-gateway").start()``; ``.issuer``; ``.token(...)``."""

    def __init__(self, audience: str, realm: str = "hospital") -> None:
        self.audience = audience
        super().__init__()
        self.path = f"/realms/{realm}"
        self.issuer = f"http://127.0.0.1:{self.port}{self.path}"
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.signing_kid = ""
        self.rotate()
        self.down = False
        self.fetches: list[str] = []  # paths asked

    def rotate(self) -> str:
        """A new signing key, published beside the old ones; its key ID."""
        kid = f"key-{len(self.keys) + 1}"
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.signing_kid = kid
        return kid

    def token(self, user: str = "alice", lifetime: int = 300, key: rsa.RSAPrivateKey | None = None,
              kid: str | None = None, **claims: Any) -> str:
        """An access token as the provider issues it; ``claims`` override or add."""
        now = int(time.time())
        body = {
            "iss": self.issuer, "aud": self.audience, "sub": f"f81d4fae-{user}", "preferred_username": user,
            "iat": now, "nbf": now, "exp": now + lifetime, "scope": "openid profile dicom.read", "typ": "Bearer",
            **claims,
        }
        kid = kid or self.signing_kid
        return jwt.encode(body, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/protocol/openid-connect/certs",
            "token_endpoint": f"{self.issuer}/protocol/openid-connect/token",
            "id_token_signing_alg_values_supported": ["RS256"],
        }

    def get(self, path: str, headers: dict[str, str]) -> Answer:
        self.fetches.append(path)
        if self.down:
            return 503, {"error": "unavailable"}, {}
        if path == f"{self.path}/.well-known/openid-configuration":
            return 200, self.discovery(), {}
        if path == f"{self.path}/protocol/openid-connect/certs":
            return 200, self.jwks(), {}
        return 404, {"error": "not found"}, {}
