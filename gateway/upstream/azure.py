"""Access tokens from an Azure managed identity, for Azure's DICOM service reached
from inside Azure (a VM or scale set, AKS, App Service, Container Apps): the identity
is the machine's or the pod's, so no secret is written anywhere.

Azure answers on the Instance Metadata Service of a VM (``Metadata: true``, API
2018-02-01), or, where ``IDENTITY_ENDPOINT`` and ``IDENTITY_HEADER`` are set (App
Service, Container Apps), on that endpoint with that header (API 2019-08-01). In an
AKS pod with workload identity (``AZURE_FEDERATED_TOKEN_FILE``, ``AZURE_CLIENT_ID``,
``AZURE_TENANT_ID``), Entra ID's token endpoint takes the pod's service account token,
re-read at each request (the kubelet rotates it), as a client assertion. All answer
RFC 6749's token shape, so `TokenEndpoint` does the rest: renewal before expiry,
refusals holding delivery, the endpoint down retried.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

from yarl import URL

from gateway.config import AuthConfig
from gateway.upstream.errors import UpstreamAuthError
from gateway.upstream.oauth import TokenEndpoint

IMDS_TOKEN_URL = "http://169.254.169.254/metadata/identity/oauth2/token"
DICOM_RESOURCE = "https://dicom.healthcareapis.azure.com"
ENTRA_AUTHORITY = "https://login.microsoftonline.com/"
JWT_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
WORKLOAD_VARIABLES = ("AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID")


def azure_identity(auth: AuthConfig, environ: Mapping[str, str] = os.environ) -> TokenEndpoint:
    """The signer of ``azure_managed_identity``: the pod's workload identity where AKS
    set its variables (and no ``token_url`` names another endpoint), else the machine's
    managed identity."""
    if all(environ.get(name) for name in WORKLOAD_VARIABLES) and not auth.token_url:
        return WorkloadIdentity(auth, environ=environ)
    return ManagedIdentity(auth, environ=environ)


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


class WorkloadIdentity(TokenEndpoint):
    """Tokens for ``auth.resource`` from Entra ID for an AKS pod's workload identity:
    the client credentials grant with the projected service account token as a JWT
    client assertion instead of a secret."""

    refused = "refused the pod's workload identity"

    def __init__(
        self, auth: AuthConfig, *, environ: Mapping[str, str] = os.environ, clock: Callable[[], float] = time.monotonic
    ) -> None:
        authority = environ.get("AZURE_AUTHORITY_HOST") or ENTRA_AUTHORITY
        url = f"{authority.rstrip('/')}/{environ['AZURE_TENANT_ID']}/oauth2/v2.0/token"
        super().__init__(url, f"token endpoint {URL(url).host}", True, clock)
        self.client_id = auth.client_id or environ["AZURE_CLIENT_ID"]
        self.scope = f"{(auth.resource or DICOM_RESOURCE).rstrip('/')}/.default"
        self.token_file = environ["AZURE_FEDERATED_TOKEN_FILE"]

    def _request(self) -> tuple[str, dict[str, str] | None, dict[str, str]]:
        try:
            with open(self.token_file, encoding="ascii") as file:
                assertion = file.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UpstreamAuthError(f"cannot read the workload identity token {self.token_file}: {exc}") from None
        form = {
            "grant_type": "client_credentials", "client_id": self.client_id, "scope": self.scope,
            "client_assertion_type": JWT_ASSERTION, "client_assertion": assertion,
        }
        return "POST", form, {"Accept": "application/json"}
