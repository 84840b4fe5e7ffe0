"""The facade behind a hospital's OpenID Connect provider: viewers and scripts call it
with the provider's access tokens (curl as the vendor documents it, dicomweb-client as a
script), the gateway checks them against the keys the provider publishes (an emulator of
Keycloak's published side: no provider runs here), names the user in the audit trail,
and answers 503, not 401, while the provider's keys cannot be had."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.oidc import OidcProvider
from tests.support.ports import wait_until
from tests.support.synth import ct_series


@pytest.fixture
def provider() -> Iterator[OidcProvider]:
    server = OidcProvider(audience="dicom-gateway").start()
    yield server
    server.stop()


def oidc_gateway(gateway: Callable[..., Gateway], provider: OidcProvider, tmp_path: Path) -> Gateway:
    return gateway(
        extra=(
            f'\n[http.auth.oidc]\nissuer = "{provider.issuer}"\naudience = "dicom-gateway"\n'
            f'required_scopes = ["dicom.read"]\nwrite_scopes = ["dicom.write"]\n\n[audit]\nfile = "{tmp_path / "audit.log"}"\n'
        ),
    )


def audited_users(path: Path) -> set[str]:
    users = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        message = ET.fromstring(line.split(" - ", 1)[1])
        users |= {p.get("UserID", "") for p in message.findall("ActiveParticipant")}
    return users


def test_a_providers_tokens_open_the_facade_and_name_the_user(
    tmp_path: Path, provider: OidcProvider, gateway: Callable[..., Gateway]
) -> None:
    gw = oidc_gateway(gateway, provider, tmp_path)
    files = ct_series(tmp_path / "ct", 2, rows=32, columns=32)
    assert dcmtk.storescu(gw.port, files, gw.ae_title).returncode == 0
    gw.wait_counts(delivered=2)
    study = pydicom.dcmread(files[0]).StudyInstanceUID
    url = f"{gw.web_url}/dicom-web"

    r = curl(f"{url}/studies")
    assert r.status == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = curl(f"{url}/studies", "--header", f"Authorization: Bearer {provider.token('alice')}")
    assert r.status == 200 and study.encode() in r.body
    for refused in (
        provider.token("mallory", aud="another-application"),
        provider.token("mallory", lifetime=-300),
        provider.token("mallory", scope="openid"),
    ):
        assert curl(f"{url}/studies", "--header", f"Authorization: Bearer {refused}").status == 401

    client = DICOMwebClient(url, headers={"Authorization": f"Bearer {provider.token('bob')}"})
    found = client.search_for_series(study)
    assert [s["0020000E"]["Value"][0] for s in found] == [pydicom.dcmread(files[0]).SeriesInstanceUID]
    instance = client.retrieve_instance(study, pydicom.dcmread(files[0]).SeriesInstanceUID, pydicom.dcmread(files[0]).SOPInstanceUID)
    assert instance.SOPInstanceUID == pydicom.dcmread(files[0]).SOPInstanceUID

    wait_until(lambda: {"oidc alice", "oidc bob"} <= audited_users(tmp_path / "audit.log"), 10, 0.2, "users not audited")
    log = gw.log()
    assert "access token refused: Signature has expired" in log and "access token refused: scope dicom.read missing" in log
    assert provider.token("alice").split(".")[2] not in log  # no token in the log


def test_keys_unavailable_is_503_until_the_provider_is_back(
    tmp_path: Path, provider: OidcProvider, gateway: Callable[..., Gateway]
) -> None:
    gw = oidc_gateway(gateway, provider, tmp_path)
    url = f"{gw.web_url}/dicom-web/studies"
    provider.down = True
    r = curl(url, "--header", f"Authorization: Bearer {provider.token('alice')}")
    assert r.status == 503 and r.headers["retry-after"] == "5" and b"OpenID provider" in r.body
    probe = gw.cli("check-config", "--online")
    assert probe.returncode == 1 and f"OpenID provider {provider.issuer}: FAILED" in probe.stdout, probe.stdout
    provider.down = False
    probe = gw.cli("check-config", "--online")
    assert probe.returncode == 0 and f"OpenID provider {provider.issuer}: OK (1 signing key(s))" in probe.stdout

    def admitted() -> bool:
        return curl(url, "--header", f"Authorization: Bearer {provider.token('alice')}").status == 200

    wait_until(admitted, 15, 0.5, "not admitted once the provider is back")


def test_storing_and_deleting_need_the_write_scope(
    tmp_path: Path, provider: OidcProvider, gateway: Callable[..., Gateway]
) -> None:
    """A reader's token may search and read, not store or delete: 403 with RFC 6750's
    insufficient_scope, logged and audited; a token with dicom.write may."""
    gw = oidc_gateway(gateway, provider, tmp_path)
    (instance,) = ct_series(tmp_path / "ct", 1, rows=32, columns=32)
    ds = pydicom.dcmread(instance)
    url = f"{gw.web_url}/dicom-web"
    reader = provider.token("rita", scope="openid dicom.read")
    writer = provider.token("walt", scope="openid dicom.read dicom.write")
    stow = ("-X", "POST", "--header", "Content-Type: application/dicom", "--data-binary", f"@{instance}", f"{url}/studies")
    r = curl(*stow, "--header", f"Authorization: Bearer {reader}")
    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["www-authenticate"] and b"dicom.write" in r.body
    assert curl(*stow, "--header", f"Authorization: Bearer {writer}").status == 200
    gw.wait_counts(delivered=1)
    study = f"{url}/studies/{ds.StudyInstanceUID}"
    assert curl("-X", "DELETE", study, "--header", f"Authorization: Bearer {reader}").status == 403
    assert curl(f"{study}/metadata", "--header", f"Authorization: Bearer {reader}").status == 200
    assert "403, the token lacks a write scope" in gw.log()
