"""An OpenID Connect provider's published side, faithful on the wire to Keycloak's: the
discovery document at ``{issuer}/.well-known/openid-configuration`` and the signing keys
(JWKS) it names, plus access tokens signed with those keys (RS256, as Keycloak and
Entra ID sign them). No provider runs here; this is the fake, the verifier is the
gateway's. Keys can be rotated and the provider taken down.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.ports import free_port


class OidcProvider:
    """``OidcProvider(audience="dicom-gateway").start()``; ``.issuer``; ``.token(...)``."""

    def __init__(self, audience: str, realm: str = "hospital") -> None:
        self.audience = audience
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}/realms/{realm}"
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.signing_kid = ""
        self.rotate()
        self.down = False
        self.fetches: list[str] = []  # paths asked
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> OidcProvider:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

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

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                provider.fetches.append(self.path)
                base = provider.issuer.split(str(provider.port), 1)[1]
                answer: object = None
                if not provider.down:
                    if self.path == f"{base}/.well-known/openid-configuration":
                        answer = provider.discovery()
                    elif self.path == f"{base}/protocol/openid-connect/certs":
                        answer = provider.jwks()
                status = 503 if provider.down else 200 if answer is not None else 404
                body = json.dumps(answer if answer is not None else {"error": "unavailable" if provider.down else "not found"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        return Handler
