"""The OAuth 2.0 client credentials signer (gateway.upstream.oauth) against a token
endpoint that answers like Entra ID and Keycloak do (tests.support.tokenserver), and
through HttpClient against a scripted archive that refuses stale tokens; the Azure
managed identity signer (gateway.upstream.azure) against Azure's identity endpoints."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.config import AuthConfig
from gateway.upstream.errors import UpstreamAuthError, UpstreamUnavailable
from gateway.upstream.http import HttpClient, SignableRequest
from gateway.upstream.azure import DICOM_RESOURCE, ManagedIdentity, azure_identity
from gateway.upstream.oauth import ClientCredentials
from tests.support.ports import closed_port
from tests.support.floodarchive import FloodArchive
from tests.support.tokenserver import AzureIdentity, TokenServer
from tests.upstream.test_http import run

CLIENT_ID = "gateway:prod"  # a ':' and a space must be form-encoded before Basic
SECRET = "p@ss word+/="
REQUEST = SignableRequest("GET", "http://archive/studies", {}, None)  # type: ignore[arg-type]


class Clock:
    """Monotonic seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def idp() -> Iterator[TokenServer]:
    server = TokenServer(CLIENT_ID, SECRET, scope="https://dicom.healthcareapis.azure.com/.default").start()
    yield server
    server.stop()


def auth(idp: TokenServer, **overrides: object) -> AuthConfig:
    fields: dict[str, object] = {
        "type": "oauth2", "token_url": idp.token_url, "client_id": CLIENT_ID, "client_secret": SECRET,
        "scope": idp.scope,
    }
    return AuthConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def bearer(headers: dict[str, str]) -> str:
    assert headers["Authorization"].startswith("Bearer ")
    return headers["Authorization"][7:]


@pytest.mark.parametrize("client_auth", ["basic", "post"])
def test_a_token_is_asked_with_the_client_credentials_and_sent_as_bearer(idp: TokenServer, client_auth: str) -> None:
    signer = ClientCredentials(auth(idp, client_auth=client_auth, params=(("resource", "https://r"),)))
    headers = asyncio.run(signer(REQUEST))
    token = bearer(dict(headers))
    assert token.count(".") == 2  # the JWT the endpoint issued, untouched
    [asked] = idp.requests
    assert (asked.client_auth, asked.client_id, asked.status) == (client_auth, CLIENT_ID, 200)
    assert asked.form["grant_type"] == "client_credentials"
    assert asked.form["scope"] == "https://dicom.healthcareapis.azure.com/.default"
    assert asked.form["resource"] == "https://r"
    assert ("client_secret" in asked.form) == (client_auth == "post")


def test_basic_client_authentication_form_encodes_before_base64() -> None:
    from gateway.upstream.oauth import _client_basic

    value = _client_basic(CLIENT_ID, SECRET)
    assert base64.b64decode(value[6:]).decode() == "gateway%3Aprod:p%40ss+word%2B%2F%3D"


def test_one_request_for_many_waiting_and_renewal_before_expiry(idp: TokenServer) -> None:
    clock = Clock()
    idp.lifetime = 3600
    signer = ClientCredentials(auth(idp), clock=clock)

    async def scenario() -> list[str]:
        first = await asyncio.gather(*(signer.token() for _ in range(20)))
        assert len(set(first)) == 1 and idp.issued == 1  # single flight
        clock.now += 3600 - 301  # still more than RENEW_BEFORE (300 s) left
        same = await signer.token()
        clock.now += 2  # now inside the last 300 s: renewed before it lapses
        renewed = await signer.token()
        return [first[0], same, renewed]

    first, same, renewed = asyncio.run(scenario())
    assert same == first and renewed != first and idp.issued == 2


def test_requests_during_a_slow_renewal_use_the_token_still_valid(idp: TokenServer) -> None:
    clock = Clock()
    idp.lifetime = 3600
    signer = ClientCredentials(auth(idp), clock=clock)

    async def scenario() -> tuple[str, list[float], list[str]]:
        first = await signer.token()
        clock.now += 3400  # due for renewal, 200 s left
        idp.delay = 1.0
        started = time.monotonic()
        renewing = asyncio.ensure_future(signer.token())
        await asyncio.sleep(0.1)
        during = [await signer.token() for _ in range(5)]
        waited = [time.monotonic() - started]
        renewed = await renewing
        return first, waited, [renewed, *during]

    first, waited, tokens = asyncio.run(scenario())
    assert waited[0] < 0.5  # not held behind the renewal
    assert tokens[1:] == [first] * 5 and tokens[0] != first and idp.issued == 2


def test_a_short_lived_token_is_renewed_at_half_its_life(idp: TokenServer) -> None:
    clock = Clock()
    idp.lifetime = 60
    idp.expires_in_as_string = True  # Entra ID's v1 endpoint sends "3599"
    signer = ClientCredentials(auth(idp), clock=clock)

    async def scenario() -> None:
        first = await signer.token()
        clock.now += 29
        assert await signer.token() == first
        clock.now += 2
        assert await signer.token() != first

    asyncio.run(scenario())
    assert idp.issued == 2


def test_wrong_secret_is_an_auth_error_naming_the_endpoints_answer(idp: TokenServer, caplog: pytest.LogCaptureFixture) -> None:
    signer = ClientCredentials(auth(idp, client_secret="wrong"))
    with pytest.raises(UpstreamAuthError) as info:
        asyncio.run(signer.token())
    message = str(info.value)
    assert "refused the gateway's client credentials" in message
    assert "invalid_client" in message and "AADSTS7000215" in message and "HTTP 401" in message
    assert "wrong" not in message and "wrong" not in caplog.text  # the secret is never told


def test_wrong_scope_is_an_auth_error(idp: TokenServer) -> None:
    with pytest.raises(UpstreamAuthError, match="invalid_scope"):
        asyncio.run(ClientCredentials(auth(idp, scope="https://other/.default")).token())


def test_a_provider_down_is_transient_and_a_valid_token_is_kept_meanwhile(idp: TokenServer) -> None:
    """While renewal fails the current token serves, renewal tried again every 30 s."""
    clock = Clock()
    idp.lifetime = 600
    signer = ClientCredentials(auth(idp), clock=clock)

    async def scenario() -> None:
        first = await signer.token()
        idp.status = 503
        clock.now += 400  # due for renewal (under 300 s left), not expired
        assert await signer.token() == first
        asked = len(idp.requests)
        clock.now += 20  # within 30 s of the failed renewal: not asked again
        assert await signer.token() == first and len(idp.requests) == asked
        clock.now += 176  # 4 s left: too close to use
        with pytest.raises(UpstreamUnavailable, match="HTTP 503"):
            await signer.token()
        idp.status = None
        assert await signer.token() != first

    asyncio.run(scenario())


def test_an_unreachable_provider_is_transient() -> None:
    url = f"http://127.0.0.1:{closed_port()}/token"
    signer = ClientCredentials(AuthConfig(type="oauth2", token_url=url, client_id="c", client_secret="s"))
    with pytest.raises(UpstreamUnavailable, match="unreachable"):
        asyncio.run(signer.token())


def test_a_token_answer_that_never_ends_is_transient() -> None:
    """A token answer is read to 1 MiB: a provider (or a proxy before it) that sends
    more holds delivery like an outage, not until the daemon runs out of memory."""
    flood = FloodArchive("endless-json").start()
    try:
        signer = ClientCredentials(AuthConfig(type="oauth2", token_url=f"{flood.url}/token", client_id="c", client_secret="s"))
        with pytest.raises(UpstreamUnavailable, match="token endpoint's answer is larger than 1 MiB$"):
            asyncio.run(signer.token())
    finally:
        flood.stop()


def test_only_the_token_the_archive_refused_is_dropped(idp: TokenServer) -> None:
    signer = ClientCredentials(auth(idp))

    async def scenario() -> None:
        stale = dict(await signer(REQUEST))
        signer.rejected(stale)
        fresh = dict(await signer(REQUEST))
        assert fresh != stale
        signer.rejected(stale)  # a late 401 to the old token keeps the new one
        assert dict(await signer(REQUEST)) == fresh

    asyncio.run(scenario())
    assert idp.issued == 2


def test_a_request_refused_with_401_goes_again_once_with_a_new_token(idp: TokenServer) -> None:
    """The archive stops taking a token before its announced expiry (revoked, or its
    clock ahead): a request with a body in memory is sent again with a fresh one."""
    refused: set[str] = set()
    seen: list[str] = []

    async def archive(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "")
        seen.append(token)
        if not refused:
            refused.add(token)  # the first token is refused from now on
        return web.Response(status=401 if token in refused else 200, text="ok")

    async def scenario(url: str) -> list[int]:
        client = HttpClient(url, timeout=5, connect_timeout=5, signer=ClientCredentials(auth(idp)))
        await client.start()
        statuses = []
        try:
            for _ in range(2):
                async with client.request("GET", client.url("studies"), what="search") as resp:
                    statuses.append(resp.status)
        finally:
            await client.close()
        return statuses

    statuses = run(lambda app: app.router.add_get("/dicom-web/studies", archive), scenario)
    assert statuses == [200, 200]
    assert len(seen) == 3 and seen[0] != seen[1] == seen[2] and idp.issued == 2


def test_a_token_refused_twice_is_the_archives_refusal(idp: TokenServer) -> None:
    async def archive(request: web.Request) -> web.Response:
        return web.Response(status=401)

    async def scenario(url: str) -> Exception:
        client = HttpClient(url, timeout=5, connect_timeout=5, signer=ClientCredentials(auth(idp)))
        await client.start()
        try:
            async with client.request("GET", client.url("studies"), what="search"):
                pass
        except UpstreamAuthError as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("no error")

    exc = run(lambda app: app.router.add_get("/dicom-web/studies", archive), scenario)
    assert exc.status == 401 and idp.issued == 2  # one replay, not a loop


@pytest.fixture
def azure() -> Iterator[AzureIdentity]:
    server = AzureIdentity(DICOM_RESOURCE, client_id="5a1f-user-assigned").start()
    yield server
    server.stop()


def test_a_vms_managed_identity_from_the_metadata_service(azure: AzureIdentity) -> None:
    clock = Clock()
    signer = ManagedIdentity(AuthConfig(type="azure_managed_identity", token_url=azure.imds_url), environ={}, clock=clock)
    assert bearer(dict(asyncio.run(signer(REQUEST)))).count(".") == 2
    assert azure.requests == [("imds", 200, "")]
    assert signer._token is not None and signer._token.renew_at == pytest.approx(clock.now + 86399 - 300, abs=2)


def test_app_services_identity_endpoint_and_a_user_assigned_identity(azure: AzureIdentity) -> None:
    """Where IDENTITY_ENDPOINT and IDENTITY_HEADER are set (App Service, Container
    Apps), that endpoint; its answer has only expires_on."""
    clock = Clock()
    environ = {"IDENTITY_ENDPOINT": azure.app_service_url, "IDENTITY_HEADER": azure.identity_header}
    auth = AuthConfig(type="azure_managed_identity", client_id="5a1f-user-assigned")
    signer = ManagedIdentity(auth, environ=environ, clock=clock)
    asyncio.run(signer.token())
    assert azure.requests == [("app_service", 200, "")]
    assert signer._token is not None and signer._token.renew_at == pytest.approx(clock.now + 86399 - 300, abs=5)


def test_an_identity_the_machine_lacks_is_refused_in_words(azure: AzureIdentity) -> None:
    auth = AuthConfig(type="azure_managed_identity", token_url=azure.imds_url, client_id="not-assigned-here")
    with pytest.raises(UpstreamAuthError) as info:
        asyncio.run(ManagedIdentity(auth, environ={}).token())
    assert str(info.value) == (
        "Azure instance metadata service refused the gateway's managed identity "
        "(HTTP 400 Bad Request, invalid_request: Identity not found); check upstream.auth"
    )


def test_an_aks_pods_workload_identity_sends_its_rotated_service_account_token(tmp_path: Path) -> None:
    """AKS sets AZURE_FEDERATED_TOKEN_FILE, AZURE_CLIENT_ID and AZURE_TENANT_ID: Entra ID
    takes the projected token as a client assertion, read anew at each request."""
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("eyJ.first-projected.token")
    idp = TokenServer("4f8e-workload", "unused", scope=f"{DICOM_RESOURCE}/.default", assertion="eyJ.first-projected.token").start()
    try:
        authority = idp.token_url.split("/tenant/")[0]
        environ = {
            "AZURE_FEDERATED_TOKEN_FILE": str(token_file), "AZURE_CLIENT_ID": "4f8e-workload",
            "AZURE_TENANT_ID": "tenant", "AZURE_AUTHORITY_HOST": f"{authority}/",
        }
        clock = Clock()
        signer = azure_identity(AuthConfig(type="azure_managed_identity"), environ)
        signer.clock = clock
        asyncio.run(signer.token())
        token_file.write_text("eyJ.rotated.token")  # the kubelet rotated it
        idp.assertion = "eyJ.rotated.token"
        clock.now += 3600
        asyncio.run(signer.token())
        assert [(r.client_auth, r.client_id, r.status) for r in idp.requests] == [("assertion", "4f8e-workload", 200)] * 2
        token_file.unlink()
        clock.now += 3600
        with pytest.raises(UpstreamAuthError, match="cannot read the workload identity token"):
            asyncio.run(signer.token())
    finally:
        idp.stop()
