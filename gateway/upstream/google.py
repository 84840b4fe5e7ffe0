"""Access tokens for the Google Cloud Healthcare API's DICOM stores, from Google's own
credentials chain (google-auth, as botocore is for AWS).

A DICOM store takes only Google OAuth 2.0 access tokens, which live an hour. The
gateway gets them the way Google's own tools do: a service account key file named in
``upstream.auth.service_account_file`` (read as that and nothing else: a credentials
file of another type may make google-auth run commands or call URLs it names), or else
Application Default Credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's application default login, the metadata
server of a Compute Engine VM or GKE pod). google-auth signs the service account's
assertion (RFC 7523) and talks to the token endpoint or metadata server; `TokenSigner`
keeps the token and renews it before expiry like any other provider's.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable, Mapping

import google.auth
import google.auth.credentials
import google.auth.exceptions
import requests
from google.auth.transport.requests import Request
from google.oauth2 import service_account

from gateway.upstream.errors import UpstreamAuthError, UpstreamUnavailable
from gateway.upstream.oauth import ASSUMED_LIFETIME, Token, TokenSigner

log = logging.getLogger("gateway.upstream")

# Enough for STOW-RS, QIDO-RS and WADO-RS on a DICOM store (narrower than cloud-platform).
SCOPES = ("https://www.googleapis.com/auth/cloud-healthcare",)


class GoogleCredentials(TokenSigner):
    """Tokens from ``service_account_file`` or Google's default chain. The credentials
    are found at the first request, not at start-up (the chain may probe the metadata
    server, which takes seconds off Google Cloud)."""

    def __init__(self, service_account_file: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__("Google credentials", clock)
        self.service_account_file = service_account_file
        self._credentials: google.auth.credentials.Credentials | None = None
        # requests takes the proxy from the environment per URL, so NO_PROXY can keep
        # the metadata server direct while the token endpoint goes through the proxy.
        self._http = requests.Session()

    def _headers(self) -> Mapping[str, str]:
        """The quota project of user credentials, as Google's client libraries send it."""
        quota = getattr(self._credentials, "quota_project_id", None)
        return {"x-goog-user-project": quota} if quota else {}

    async def _fetch(self) -> Token:
        asked = self.clock()
        token, expiry = await asyncio.to_thread(self._refresh)
        if expiry is None:
            lifetime = ASSUMED_LIFETIME
        else:
            now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)  # google-auth's naive UTC
            lifetime = max(1.0, (expiry - now).total_seconds())
        return self._token_for(token, asked, lifetime)

    def _refresh(self) -> tuple[str, datetime.datetime | None]:
        """Find the credentials once, then ask for a token (in a worker thread: google-auth
        is blocking). Google's errors become the gateway's typed ones."""
        try:
            if self._credentials is None:
                if self.service_account_file:
                    found = service_account.Credentials.from_service_account_file(self.service_account_file, scopes=SCOPES)
                else:
                    found, _ = google.auth.default(scopes=SCOPES)
                self._credentials = found
            self._credentials.refresh(Request(self._http))
        except (google.auth.exceptions.DefaultCredentialsError, ValueError, KeyError, OSError) as exc:
            raise UpstreamAuthError(f"no Google credentials: {_one_line(exc)}") from None
        except google.auth.exceptions.TransportError as exc:
            raise UpstreamUnavailable(f"{self.source}: token service unreachable: {_one_line(exc)}") from None
        except google.auth.exceptions.RefreshError as exc:
            if exc.retryable:
                raise UpstreamUnavailable(f"{self.source}: {_one_line(exc)}") from None
            message = f"Google refused the gateway's credentials: {_one_line(exc)}; check upstream.auth"
            log.error("%s", message)
            raise UpstreamAuthError(message) from None
        token = self._credentials.token
        if not token:
            raise UpstreamAuthError("Google credentials gave no access token")
        return token, self._credentials.expiry


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """google-auth's message without the response it carries as a second argument."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
    return " ".join(text.split())[:limit]
