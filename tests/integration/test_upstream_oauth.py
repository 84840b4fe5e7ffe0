"""An archive that takes only an identity provider's short-lived access tokens, as
Azure's DICOM service takes Entra ID's and a Google Cloud DICOM store Google's: a real
Orthanc behind a real HAProxy that verifies each JWT's signature, audience and expiry,
the tokens issued by emulators of Entra ID's token endpoint, Azure's managed identity
endpoint and Google's token endpoint and metadata server (the only fakes: no identity
provider runs here).

With ``upstream.auth.type = "oauth2"`` the gateway delivers dcmtk's C-STOREs, answers
findscu and the facade's QIDO-RS through it, renews its token before expiry, replaces
one the archive stops taking early, and holds delivery (nothing lost, nothing dead)
while the token endpoint refuses its secret. With ``"azure_managed_identity"`` and
``"google"`` it does the same with the identity of the machine it runs on, or (Google)
a service account key.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.googleidp import GoogleIdp
from tests.support.haproxy import HAProxy, jwt_config
from tests.support.orthanc import Orthanc
from tests.support.ports import wait_until
from tests.support.synth import ct_series
from tests.support.tokenserver import AzureIdentity, TokenServer

CLIENT_ID = "dicom-gateway"
SECRET = "the-right-secret-4711"
SCOPE = "https://archive.example/.default"
AUDIENCE = "https://archive.example"
SIGNING_SECRET = "the-archive-trusts-this-issuer"


@pytest.fixture
def idp() -> Iterator[TokenServer]:
    server = TokenServer(CLIENT_ID, SECRET, scope=SCOPE, audience=AUDIENCE, signing_secret=SIGNING_SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def google() -> Iterator[GoogleIdp]:
    server = GoogleIdp(audience=AUDIENCE, signing_secret=SIGNING_SECRET).start()
    yield server
    server.stop()


@pytest.fixture
def guarded(tmp_path: Path, orthanc: Orthanc) -> Iterator[HAProxy]:
    """Orthanc's DICOMweb behind HAProxy taking only tokens the emulators issue."""
    proxy = HAProxy(
        tmp_path / "haproxy", config=lambda port: jwt_config(port, orthanc.http_port, SIGNING_SECRET, AUDIENCE)
    ).start()
    yield proxy
    proxy.stop()


def oauth_gateway(gateway: Callable[..., Gateway], proxy: HAProxy, idp: TokenServer, secret: str) -> Gateway:
    upstream = (
        f'type = "dicomweb"\nurl = "http://127.0.0.1:{proxy.port}/dicom-web"\ntimeout = 30\n'
        f'[upstream.auth]\ntype = "oauth2"\ntoken_url = "{idp.token_url}"\nclient_id = "{CLIENT_ID}"\n'
        f'client_secret = "env:GW_CLIENT_SECRET"\nscope = "{SCOPE}"\n'
    )
    return gateway(upstream=upstream, env={"GW_CLIENT_SECRET": secret})


def refusals(proxy: HAProxy) -> int:
    return sum(1 for line in proxy.log().splitlines() if line.startswith("401 "))


def study_found(gw: Gateway, study_uid: str, out: Path) -> bool:
    out.mkdir(parents=True, exist_ok=True)
    result = dcmtk.findscu(
        gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid}, output_dir=out
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return [pydicom.dcmread(p).StudyInstanceUID for p in sorted(out.glob("rsp*.dcm"))] == [study_uid]


def send(gw: Gateway, files: list[Path]) -> None:
    result = dcmtk.storescu(gw.port, files, gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr


def test_delivery_and_queries_with_tokens_renewed_before_they_expire(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, idp: TokenServer, gateway: Callable[..., Gateway]
) -> None:
    idp.lifetime = 4  # renewed at half its life: several tokens within the test
    gw = oauth_gateway(gateway, guarded, idp, SECRET)
    first = ct_series(tmp_path / "first", 3, rows=64, columns=64)
    send(gw, first)
    gw.wait_counts(delivered=3, timeout=60)
    study = pydicom.dcmread(first[0]).StudyInstanceUID
    assert study_found(gw, study, tmp_path / "find1")
    time.sleep(2.5)  # the first token is due for renewal now
    second = ct_series(tmp_path / "second", 3, rows=64, columns=64)
    send(gw, second)
    gw.wait_counts(delivered=6, timeout=60)
    qido = curl("-s", f"{gw.web_url}/dicom-web/studies?StudyInstanceUID={study}")
    assert qido.status == 200 and [s["0020000D"]["Value"][0] for s in json.loads(qido.body)] == [study]

    assert len(orthanc.sop_instance_uids()) == 6
    assert idp.issued >= 2 and all(r.status == 200 and r.client_auth == "basic" for r in idp.requests)
    assert refusals(guarded) == 0  # renewed before expiry: the archive never saw a stale token
    log = gw.log()
    assert "access token obtained" in log and SECRET not in log
    probe = gw.cli("check-config", "--online")  # what an admin runs before starting it
    assert probe.returncode == 0 and f"upstream http://127.0.0.1:{guarded.port}/dicom-web: OK (HTTP 200)" in probe.stdout


def test_a_token_the_archive_stops_taking_early_is_replaced(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, idp: TokenServer, gateway: Callable[..., Gateway]
) -> None:
    """Each token is announced for an hour but expires in 2 s at the archive (revoked,
    or the archive's clock ahead): the gateway learns it from the 401 alone."""
    idp.valid_for = 2
    gw = oauth_gateway(gateway, guarded, idp, SECRET)
    first = ct_series(tmp_path / "first", 2, rows=64, columns=64)
    send(gw, first)
    gw.wait_counts(delivered=2, timeout=60)
    time.sleep(3)
    # A search goes again at once with a new token: findscu sees only Success.
    assert study_found(gw, pydicom.dcmread(first[0]).StudyInstanceUID, tmp_path / "find")
    assert refusals(guarded) == 1 and idp.issued == 2
    time.sleep(3)
    # A STOW-RS streamed from the spool cannot go again at once: the batch is retried
    # with the new token, and nothing is lost or dead.
    send(gw, ct_series(tmp_path / "second", 2, rows=64, columns=64))
    counts = gw.wait_counts(delivered=4, timeout=60)
    assert counts.get("dead", 0) == 0 and len(orthanc.sop_instance_uids()) == 4
    assert refusals(guarded) == 2 and idp.issued == 3


def test_a_refused_client_secret_holds_delivery_until_it_is_fixed(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, idp: TokenServer, gateway: Callable[..., Gateway]
) -> None:
    gw = oauth_gateway(gateway, guarded, idp, "a-wrong-secret-0815")
    files = ct_series(tmp_path / "series", 3, rows=64, columns=64)
    send(gw, files)  # acknowledged: durable in the spool

    def held() -> list[dict]:
        return [p for p in gw.health()["problems"] if p["component"] == "archive"]

    wait_until(lambda: bool(held()), 30, 0.2, "delivery not held")
    (problem,) = held()
    assert "invalid_client" in problem["reason"] and "AADSTS7000215" in problem["reason"]
    found = dcmtk.findscu(gw.port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""}, extra_args=("-v",))
    assert "Final Find Response (Failed: UnableToProcess)" in found.stdout + found.stderr
    time.sleep(2)  # with retry_max_seconds = 2, several held attempts pass
    counts = gw.counts()
    assert counts.get("delivered", 0) == 0 and counts.get("dead", 0) == 0
    assert orthanc.sop_instance_uids() == set() and refusals(guarded) == 0
    log = gw.log()
    assert "refused the gateway's client credentials" in log and "a-wrong-secret-0815" not in log
    probe = gw.cli("check-config", "--online")
    assert probe.returncode == 1 and "FAILED" in probe.stdout and "invalid_client" in probe.stdout, probe.stdout + probe.stderr

    gw.stop()
    gw.env["GW_CLIENT_SECRET"] = SECRET
    gw.start()
    gw.wait_counts(delivered=3, timeout=60)
    assert orthanc.sop_instance_uids() == {pydicom.dcmread(f).SOPInstanceUID for f in files}
    wait_until(lambda: not held(), 10, 0.2, "hold not cleared")


def google_gateway(gateway: Callable[..., Gateway], proxy: HAProxy, tmp_path: Path, auth: str, env: dict[str, str]) -> Gateway:
    """A gateway whose archive wants Google tokens; ``env`` places it: with no
    gcloud login (an empty CLOUDSDK_CONFIG) and nothing of Google's reachable
    unless ``env`` says where."""
    (tmp_path / "gcloud").mkdir(exist_ok=True)
    upstream = (
        f'type = "dicomweb"\nurl = "http://127.0.0.1:{proxy.port}/dicom-web"\ntimeout = 30\n'
        f'[upstream.auth]\ntype = "google"\n{auth}'
    )
    return gateway(upstream=upstream, env={"CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), **env})


def test_google_service_account_key(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, google: GoogleIdp, gateway: Callable[..., Gateway]
) -> None:
    key = google.service_account_file(tmp_path / "service-account.json")
    gw = google_gateway(gateway, guarded, tmp_path, f'service_account_file = "{key}"\n', {"NO_GCE_CHECK": "True"})
    files = ct_series(tmp_path / "series", 3, rows=64, columns=64)
    send(gw, files)
    gw.wait_counts(delivered=3, timeout=60)
    assert study_found(gw, pydicom.dcmread(files[0]).StudyInstanceUID, tmp_path / "find")
    assert google.requests == [("token", 200, "")] and refusals(guarded) == 0
    assert "PRIVATE KEY" not in gw.log()


def test_google_metadata_server_of_the_vm(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, google: GoogleIdp, gateway: Callable[..., Gateway]
) -> None:
    """No key anywhere: Application Default Credentials find the metadata server, as on
    a Compute Engine VM or a GKE pod."""
    gw = google_gateway(gateway, guarded, tmp_path, "", {"GCE_METADATA_HOST": google.host, "GCE_METADATA_IP": google.host})
    files = ct_series(tmp_path / "series", 2, rows=64, columns=64)
    send(gw, files)
    gw.wait_counts(delivered=2, timeout=60)
    assert ("metadata", 200, "") in google.requests and refusals(guarded) == 0


def test_no_google_credentials_holds_delivery(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, gateway: Callable[..., Gateway]
) -> None:
    gw = google_gateway(gateway, guarded, tmp_path, "", {"NO_GCE_CHECK": "True"})
    send(gw, ct_series(tmp_path / "series", 2, rows=64, columns=64))
    wait_until(lambda: any("no Google credentials" in p["reason"] for p in gw.health()["problems"]), 30, 0.2, "not held")
    counts = gw.counts()
    assert counts.get("delivered", 0) == 0 and counts.get("dead", 0) == 0 and refusals(guarded) == 0


def test_azure_managed_identity_of_an_app_service(
    tmp_path: Path, orthanc: Orthanc, guarded: HAProxy, gateway: Callable[..., Gateway]
) -> None:
    """No secret in the config: the identity endpoint and its header come from the
    environment App Service and Container Apps give the process."""
    identity = AzureIdentity(AUDIENCE, signing_secret=SIGNING_SECRET).start()
    try:
        upstream = (
            f'type = "dicomweb"\nurl = "http://127.0.0.1:{guarded.port}/dicom-web"\ntimeout = 30\n'
            f'[upstream.auth]\ntype = "azure_managed_identity"\nresource = "{AUDIENCE}"\n'
        )
        env = {"IDENTITY_ENDPOINT": identity.app_service_url, "IDENTITY_HEADER": identity.identity_header}
        gw = gateway(upstream=upstream, env=env)
        files = ct_series(tmp_path / "series", 2, rows=64, columns=64)
        send(gw, files)
        gw.wait_counts(delivered=2, timeout=60)
        assert study_found(gw, pydicom.dcmread(files[0]).StudyInstanceUID, tmp_path / "find")
        assert identity.requests == [("app_service", 200, "")] and refusals(guarded) == 0
        assert identity.identity_header not in gw.log()
    finally:
        identity.stop()
