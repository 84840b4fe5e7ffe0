"""Access tokens from an Azure managed identity, for Azure's DICOM service reached
from inside Azure (a VM or scale set, an AKS node, App Service, Container Apps): the
identity is the machine's, so no secret is written anywhere.

Azure answers on the Instance Metadata Service of a VM (``Metadata: true``, API
2018-02-01), or, where ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set (App
Service, Container Apps), on that endpoint with that header (API 2019-08-01). Both
answer RFC 6749's token shape, so `TokenEndpoint` does the rest: renewal before
expiry, refusals holding delivery, the endpoint down retried.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from yarl import URL

from gateway.config import AuthConfig
from gateway.upstream.oauth import TokenEndpoint

IMDS_TOKEN_URL = "http://169.254.169.254/metadata/identity/oauth2/token"
DICOM_RESOURCE = "https://dicom.healthcareapis.azure.com"


class ManagedIdentity(TokenEndpoint):
    """Tokens for ``auth.resource`` from the system-assigned identity, or the
    user-assigned one whose ``auth.client_id`` is given. ``auth.token_url`` replaces
    the VM's metadata endpoint (an egress proxy's address)."""

    refused = "refused the gateway's managed identity"

    def __init__(
        self, auth: AuthConfig, *, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic
    ) -> None:
        endpoint, secret = environ.get("IDENTITY_ENDPOINT", ""), environ.get("IDENTITY_HEADER", "")
        self.app_service = bool(endpoint and secret and not auth.token_url)
        if self.app_service:
            url, source, api = endpoint, "Azure managed identity endpoint", "2019-08-01"
            self.headers = {"X-IDENTITY-HEADER": secret}
        else:
            url, source, api = auth.token_url or IMDS_TOKEN_URL, "Azure instance metadata service", "2018-02-01"
            self.headers = {"Metadata": "true"}
        query = {"api-version": api, "resource": auth.resource or DICOM_RESOURCE}
        if auth.client_id:
            query["client_id"] = auth.client_id
        super().__init__(str(URL(url).update_query(query)), source, True, clock)

    def _request(self) -> tuple[str, dict[str, str] | None, dict[str, str]]:
        return "GET", None, {"Accept": "application/json", **self.headers}
