"""AWS Signature Version 4 for HealthImaging's DICOMweb requests, as a `Signer` of the
HTTP plumbing (``gateway.upstream.http``), with credentials from botocore's chain.

The DICOMweb operations are not in botocore's ``medical-imaging`` model, so botocore's
`SigV4Auth` signs requests that aiohttp sends. Two things make a signature hold:

* the query string goes on the wire exactly as it was signed. SigV4 canonicalises
  each parameter (decoded, then encoded leaving only ``A-Z a-z 0-9 - _ . ~``, sorted)
  while botocore, given a URL, signs its query as it finds it; so queries are put in
  canonical form once, by `canonical_query`, and sent in that form (QIDO values with
  ``^``, ``*``, ``?``, ``,`` or non-ASCII characters included);
* the payload hash is signed: every body's SHA-256 is known before sending (a STOW-RS
  body streamed from spool files is hashed first, see `HealthImagingUpstream`).

Credentials are resolved lazily and kept as botocore's own object: refreshable ones
(SSO, roles, ``credential_process``) are frozen anew for each request, refreshed by
botocore before they expire (in a thread: a refresh may run a process or call STS),
never cached longer than valid. Missing or unrefreshable credentials raise
UpstreamAuthError, which holds delivery like a refusal of the service.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from urllib.parse import quote_from_bytes, unquote_to_bytes

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import (
    Credentials,
    ReadOnlyCredentials,
    RefreshableCredentials,
)
from botocore.exceptions import BotoCoreError

from gateway.upstream.errors import UpstreamAuthError
from gateway.upstream.http import SignableRequest

SERVICE = "medical-imaging"
# What SigV4Auth adds to a request, all sent.
SIGNATURE_HEADERS = ("Authorization", "X-Amz-Date", "X-Amz-Security-Token", "X-Amz-Content-SHA256")


def canonical_query(query: str) -> str:
    """An encoded query string in SigV4 canonical form: every name and value decoded,
    then percent-encoded except the unreserved characters, the pairs sorted. Sent as
    it is, the string the service canonicalises is the string that was signed."""
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((quote_from_bytes(unquote_to_bytes(name), safe=""), quote_from_bytes(unquote_to_bytes(value), safe="")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


class AwsCredentials:
    """botocore's credential chain (or one profile of it), resolved on first use; its
    session also makes the native API's client, so both share one set of credentials."""

    def __init__(self, profile: str = "") -> None:
        self.profile = profile
        self._credentials: Credentials | None = None
        self._session: botocore.session.Session | None = None
        self._session_lock = threading.Lock()

    @property
    def session(self) -> botocore.session.Session:
        """The botocore session (blocking to create, and created from worker threads:
        the signer's and the native client's share one)."""
        with self._session_lock:
            if self._session is None:
                self._session = botocore.session.Session(profile=self.profile or None)
            return self._session

    def _resolve(self) -> Credentials:
        credentials = self.session.get_credentials()
        if credentials is None:
            raise UpstreamAuthError(
                "no AWS credentials: botocore's chain found none (environment, shared config and "
                "credentials files, SSO, container or instance role)"
                + (f" for profile {self.profile!r}" if self.profile else "")
            )
        return credentials

    async def frozen(self) -> ReadOnlyCredentials:
        """Credentials valid now, for one request; raises UpstreamAuthError."""
        try:
            if self._credentials is None:
                self._credentials = await asyncio.to_thread(self._resolve)
            credentials: Credentials = self._credentials
            if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
                return await asyncio.to_thread(credentials.get_frozen_credentials)
            return credentials.get_frozen_credentials()
        except (BotoCoreError, ValueError, OSError, RuntimeError) as exc:
            detail = " ".join(str(exc).split())[:200]
            raise UpstreamAuthError(f"AWS credentials unavailable: {type(exc).__name__}: {detail}") from None


class SigV4Signer:
    """Signs every attempt anew (its own X-Amz-Date, fresh credentials)."""

    def __init__(self, region: str, credentials: AwsCredentials) -> None:
        self.region = region
        self.credentials = credentials

    async def __call__(self, request: SignableRequest) -> Mapping[str, str]:
        if request.body.sha256 is None:
            raise ValueError("SigV4 signs the payload hash: hash a streamed body before sending it")
        frozen = await self.credentials.frozen()
        aws = AWSRequest(method=request.method, url=request.url, headers=dict(request.headers))
        aws.headers["X-Amz-Content-SHA256"] = request.body.sha256
        SigV4Auth(frozen, SERVICE, self.region).add_auth(aws)
        return {name: aws.headers[name] for name in SIGNATURE_HEADERS if name in aws.headers}
