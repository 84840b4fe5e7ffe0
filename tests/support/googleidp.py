"""Google's token services, faithful on the wire, for the gateway's ``google`` upstream
auth: the OAuth 2.0 token endpoint a service account's signed assertion goes to (RFC
7523 JWT bearer grant, RS256 checked against the account's public key) and a Compute
Engine metadata server (``Metadata-Flavor: Google``). Nothing of Google's runs here, so
this is the fake; the access tokens it issues are HS256 JWTs that a real HAProxy in
front of a real Orthanc verifies (`tests.support.haproxy.jwt_config`).
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.support.jsonserver import Answer, JsonServer
from tests.support.tokenserver import hs256_jwt

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
HEALTHCARE_SCOPE = "https://www.googleapis.com/auth/cloud-healthcare"
SERVICE_ACCOUNT = "dicom-gateway@hospital-imaging.iam.gserviceaccount.com"
# The audience of every service account assertion, wherever its token_uri points.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class GoogleIdp(JsonServer):
    """``GoogleIdp(audience=...).start()``; `service_account_file` writes a key file
    whose ``token_uri`` points here; the metadata server answers on the same port."""

    def __init__(self, audience: str, signing_secret: str = "haproxy-verifies-this", lifetime: int = 3599) -> None:
        self.audience = audience
        self.signing_secret = signing_secret
        self.lifetime = lifetime
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.requests: list[tuple[str, int, str]] = []  # (kind, status, error)
        self.issued = 0
        super().__init__()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"http://{self.host}/token"

    def post(self, path: str, headers: dict[str, str], body: bytes) -> Answer:
        if path != "/token":
            return 404, {"error": "not found"}, {}
        status, answer = self.token(body)
        return status, answer, {}

    def get(self, path: str, headers: dict[str, str]) -> Answer:
        """Every metadata answer says ``Metadata-Flavor: Google``, what google-auth's
        detection of Compute Engine looks for."""
        status, answer, content_type = self.metadata(path, headers)
        return status, answer, {"Metadata-Flavor": "Google", "Content-Type": content_type}

    def service_account_file(self, path: Path, key: rsa.RSAPrivateKey | None = None) -> Path:
        """A service account key file as the Cloud console downloads it, signed with
        ``key`` (default: the one this endpoint knows; another makes it refuse)."""
        pem = (key or self.key).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.write_text(json.dumps({
            "type": "service_account",
            "project_id": "hospital-imaging",
            "private_key_id": "0123456789abcdef",
            "private_key": pem.decode(),
            "client_email": SERVICE_ACCOUNT,
            "client_id": "106842395217843290812",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
        }))
        path.chmod(0o600)
        return path

    def _issue(self, kind: str) -> dict[str, object]:
        now = int(time.time())
        self.issued += 1
        self.requests.append((kind, 200, ""))
        claims = {"aud": self.audience, "iat": now, "exp": now + self.lifetime, "sub": SERVICE_ACCOUNT, "jti": str(self.issued)}
        return {"access_token": hs256_jwt(claims, self.signing_secret), "expires_in": self.lifetime, "token_type": "Bearer"}

    def _refuse(self, kind: str, status: int, error: str, detail: str) -> tuple[int, dict[str, object]]:
        self.requests.append((kind, status, error))
        return status, {"error": error, "error_description": detail}

    def token(self, raw: bytes) -> tuple[int, dict[str, object]]:
        """The JWT bearer grant: the assertion must be signed by the service account's
        key, issued by it, addressed to Google's token endpoint, in time and scoped."""
        form = {k: v[0] for k, v in parse_qs(raw.decode("ascii")).items()}
        if form.get("grant_type") != JWT_BEARER:
            return self._refuse("token", 400, "unsupported_grant_type", form.get("grant_type", ""))
        try:
            head, body, signature = form["assertion"].split(".")
            self.key.public_key().verify(
                _unb64(signature), f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256()
            )
            claims = json.loads(_unb64(body))
        except (KeyError, ValueError, InvalidSignature):
            return self._refuse("token", 400, "invalid_grant", "Invalid JWT Signature.")
        now = time.time()
        if claims.get("iss") != SERVICE_ACCOUNT or claims.get("aud") != GOOGLE_TOKEN_AUDIENCE:
            return self._refuse("token", 400, "invalid_grant", "Invalid JWT: iss or aud.")
        if not claims.get("iat", now + 999) <= now + 60 < claims.get("exp", 0) + 60:
            return self._refuse("token", 400, "invalid_grant", "Invalid JWT: Token must be a short-lived token")
        if HEALTHCARE_SCOPE not in str(claims.get("scope", "")).split():
            return self._refuse("token", 400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        return 200, self._issue("token")

    def metadata(self, path: str, headers: dict[str, str]) -> tuple[int, object, str]:
        """A Compute Engine metadata server: the flavor header both ways, the default
        service account and its token."""
        if headers.get("metadata-flavor") != "Google":
            return 403, "Missing Metadata-Flavor:Google header.", "text/html"
        url = urlsplit(path)
        if url.path in ("", "/"):
            return 200, "computeMetadata/", "application/text"
        if url.path == "/computeMetadata/v1/project/project-id":
            return 200, "hospital-imaging", "application/text"
        if url.path == "/computeMetadata/v1/instance/service-accounts/default/":
            return 200, {"aliases": ["default"], "email": SERVICE_ACCOUNT, "scopes": [HEALTHCARE_SCOPE]}, "application/json"
        if url.path == "/computeMetadata/v1/instance/service-accounts/default/token":
            scopes = parse_qs(url.query).get("scopes", [HEALTHCARE_SCOPE])[0].split(",")
            if HEALTHCARE_SCOPE not in scopes:
                status, answer = self._refuse("metadata", 400, "invalid_scope", ",".join(scopes))
                return status, answer, "application/json"
            return 200, self._issue("metadata"), "application/json"
        return 404, "not found", "text/html"
