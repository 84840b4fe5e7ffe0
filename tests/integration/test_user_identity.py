"""User Identity Negotiation (PS3.7 D.3.3.7) with real requestors: dcmtk's storescu
names its user by user name and passcode (``--user --password``, ``--pos-response``),
by a bare user name, or by a JSON Web Token (``--jwt``) issued by an OpenID Connect
provider (the emulator of Keycloak's published side the facade's tests use);
pynetdicom searches as a named user. Checked: who gets in, what storescu is told,
the gateway's log line, the rejection counted, and the user in the audit trail."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
from pydicom.dataset import Dataset

from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.oidc import OidcProvider
from tests.support.ports import wait_until
from tests.support.synth import ct_series

PASSCODE = "correct horse battery staple"


@pytest.fixture
def provider() -> Iterator[OidcProvider]:
    server = OidcProvider(audience="dicom-gateway").start()
    yield server
    server.stop()


def audited_user_names(path: Path) -> list[tuple[str, str, str]]:
    """(EventID display name, UserID, UserName) of every requestor in the audit file."""
    found = []
    for line in path.read_text(encoding="utf-8").splitlines():
        message = ET.fromstring(line.split(" - ", 1)[1])
        event = message.find("EventIdentification/EventID")
        for p in message.findall("ActiveParticipant"):
            if p.get("UserIsRequestor") == "true":
                found.append((event.get("originalText", "") if event is not None else "", p.get("UserID", ""), p.get("UserName", "")))
    return found


def test_users_by_passcode_and_token_are_let_in_named_and_audited(
    tmp_path: Path, provider: OidcProvider, gateway: Callable[..., Gateway]
) -> None:
    audit = tmp_path / "audit.log"
    gw = gateway(
        env={"GW_TECH1_PASSCODE": PASSCODE},
        extra=(
            '\n[dimse.user_identity]\nusers = { tech1 = "env:GW_TECH1_PASSCODE" }\njwt = true\n'
            '\n[[dimse.peers]]\nae_title = "WS1"\nhost = "127.0.0.1"\nport = 104\nrequire_user_identity = true\n'
            f'\n[http.auth.oidc]\nissuer = "{provider.issuer}"\naudience = "dicom-gateway"\nrequired_scopes = ["dicom.read"]\n'
            f'\n[audit]\nfile = "{audit}"\n'
        ),
    )
    files = ct_series(tmp_path / "ct", 1, rows=16, columns=16)

    def store(calling: str, *identity: str) -> dcmtk.subprocess.CompletedProcess[str]:
        return dcmtk.storescu(gw.port, files, gw.ae_title, calling_ae=calling, extra_args=list(identity))

    ok = store("STORESCU", "--user", "tech1", "--password", PASSCODE, "--pos-response")
    assert ok.returncode == 0, ok.stderr  # the positive response it asked for came
    refused = store("STORESCU", "--user", "tech1", "--password", "guess")
    assert refused.returncode != 0 and "Association Rejected" in refused.stderr
    assert "Result: Rejected Permanent, Source: Service Provider (ACSE Related)" in refused.stderr
    assert store("STORESCU").returncode == 0  # not required of this caller
    claimed = store("STORESCU", "--user", "nurse", "--pos-response")
    assert claimed.returncode != 0 and "Positive response requested but none received" in claimed.stderr
    assert store("STORESCU", "--user", "nurse").returncode == 0  # a claim, recorded as such

    token = tmp_path / "token.jwt"
    token.write_text(provider.token("alice"))
    assert store("STORESCU", "--jwt", str(token)).returncode == 0
    token.write_text(provider.token("mallory", lifetime=-300))
    assert store("STORESCU", "--jwt", str(token)).returncode != 0

    # WS1 must name a user
    assert store("WS1").returncode != 0
    assert store("WS1", "--user", "nurse").returncode != 0  # a bare name proves nothing
    assert store("WS1", "--user", "tech1", "--password", PASSCODE).returncode == 0

    log = gw.log()
    assert "association accepted from STORESCU@127.0.0.1" in log
    assert "user tech1 (user name and passcode)" in log and "user alice (JSON Web Token)" in log
    assert "user nurse (user name, not verified)" in log
    assert "user 'tech1': unknown user or wrong passcode" in log and "no user identity (one is required)" in log
    assert "JSON Web Token not valid for the gateway" in log
    assert PASSCODE not in log and "guess" not in log
    metrics = curl(f"{gw.web_url}/metrics", "--header", f"Authorization: Bearer {provider.token('prometheus')}").body.decode()
    assert 'gateway_dimse_associations_rejected_total{reason="user_identity"} 4.0' in metrics

    # a search as a named user, by pynetdicom
    ae = AE(ae_title="WS1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"tech1"
    identity.secondary_field = PASSCODE.encode()
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title, ext_neg=[identity])
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    statuses = [status.Status for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if status]
    assoc.release()
    assert statuses[-1] == 0x0000

    def requestors() -> list[tuple[str, str, str]]:
        return audited_user_names(audit) if audit.exists() else []

    wait_until(lambda: any(e == "Query" and n == "tech1" for e, _, n in requestors()), 10, 0.2, "query not audited with its user")
    names = {(user, name) for event, user, name in requestors() if event == "DICOM Instances Transferred"}
    assert {("STORESCU", "tech1"), ("STORESCU", "alice"), ("STORESCU", "nurse"), ("STORESCU", ""), ("WS1", "tech1")} <= names


def test_an_address_guessing_passcodes_is_turned_away(tmp_path: Path, gateway: Callable[..., Gateway]) -> None:
    gw = gateway(
        env={"GW_TECH1_PASSCODE": PASSCODE},
        extra='\n[dimse.user_identity]\nusers = { tech1 = "env:GW_TECH1_PASSCODE" }\nmax_failures_per_minute = 3\n',
    )
    files = ct_series(tmp_path / "ct", 1, rows=16, columns=16)

    def store(*identity: str) -> dcmtk.subprocess.CompletedProcess[str]:
        return dcmtk.storescu(gw.port, files, gw.ae_title, extra_args=list(identity))

    for guess in ("123456", "password", "tech1"):
        assert "Rejected Permanent" in store("--user", "tech1", "--password", guess).stderr
    turned_away = store("--user", "tech1", "--password", PASSCODE)  # even the right one, for the rest of the minute
    assert turned_away.returncode != 0 and "Result: Rejected Transient, Source: Service Provider (ACSE Related)" in turned_away.stderr
    assert store().returncode == 0  # an association naming no user guesses nothing: a modality behind the same NAT goes on
    log = gw.log()
    assert "127.0.0.1: 3 failed user identities within a minute" in log
    assert "too many failed user identities from 127.0.0.1; turned away for" in log


def test_the_gateway_names_its_own_user_to_a_peer_that_requires_one(tmp_path: Path, gateway: Callable[..., Gateway]) -> None:
    """Gateway A calls gateway B (which requires a user of A's AE title) as a C-MOVE
    destination and for ``peers --echo``: with the user and passcode of B's peer entry
    in A it gets in, named; without them, or with a wrong passcode, it is rejected and
    says why."""
    receiver = gateway(
        ae_title="GWB", env={"GW_A_PASSCODE": PASSCODE},
        extra=(
            '\n[dimse.user_identity]\nusers = { "gateway-a" = "env:GW_A_PASSCODE" }\n'
            '\n[[dimse.peers]]\nae_title = "GWA"\nhost = "127.0.0.1"\nport = 104\nrequire_user_identity = true\n'
        ),
    )

    def entry(title: str, *lines: str) -> str:
        return f'\n[[dimse.peers]]\nae_title = "{title}"\nhost = "127.0.0.1"\nport = {receiver.port}\n' + "".join(f"{line}\n" for line in lines)

    sender = gateway(
        ae_title="GWA", env={"GW_B_PASSCODE": PASSCODE},
        extra=(
            entry("GWB", 'user = "gateway-a"', 'passcode = "env:GW_B_PASSCODE"')
            + entry("GWB_ANONYMOUS")  # the same gateway, called without a user
            + entry("GWB_WRONG", 'user = "gateway-a"', 'passcode = "guess"')
        ),
    )
    files = ct_series(tmp_path / "ct", 2, rows=16, columns=16)
    assert dcmtk.storescu(sender.port, files, sender.ae_title).returncode == 0
    sender.wait_counts(delivered=2)

    echoed = sender.cli("peers", "--echo", "--json", "--timeout", "10")
    rows = {r["ae_title"]: r["echo"] for r in json.loads(echoed.stdout)}
    assert rows["GWB"]["ok"], rows
    for refused in ("GWB_ANONYMOUS", "GWB_WRONG"):
        assert not rows[refused]["ok"] and rows[refused]["detail"].startswith("association rejected (permanent: no reason given"), rows
    assert "may not accept the user the gateway named" in rows["GWB_WRONG"]["detail"]

    study = {"StudyInstanceUID": str(pydicom.dcmread(files[0]).StudyInstanceUID)}
    moved = dcmtk.movescu(sender.port, sender.ae_title, "GWB", {"QueryRetrieveLevel": "STUDY", **study})
    assert moved.returncode == 0, moved.stderr
    receiver.wait_counts(delivered=2)
    log = receiver.log()
    assert "association accepted from GWA@127.0.0.1" in log and "user gateway-a (user name and passcode)" in log
    assert "no user identity (one is required)" in log and "user 'gateway-a': unknown user or wrong passcode" in log
    assert PASSCODE not in sender.log() + log


def test_each_user_gets_the_services_its_permissions_name(gateway: Callable[..., Gateway]) -> None:
    """tech1 may only store, rad1 only search and retrieve: the contexts of the other
    services are rejected up front (user rejection), whatever the peer may do."""
    from pynetdicom.sop_class import CTImageStorage

    gw = gateway(
        env={"GW_TECH1_PASSCODE": PASSCODE, "GW_RAD1_PASSCODE": PASSCODE + "!"},
        extra=(
            '\n[dimse.user_identity]\nusers = { tech1 = "env:GW_TECH1_PASSCODE", rad1 = "env:GW_RAD1_PASSCODE" }\n'
            'permissions = { tech1 = ["store"], rad1 = ["find", "move"] }\n'
        ),
    )

    def accepted_as(user: str, passcode: str) -> set[str]:
        ae = AE(ae_title="WS1")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        ae.add_requested_context(CTImageStorage)
        identity = UserIdentityNegotiation()
        identity.user_identity_type = 2
        identity.primary_field, identity.secondary_field = user.encode(), passcode.encode()
        assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title, ext_neg=[identity])
        assert assoc.is_established
        names = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assoc.release()
        return names

    assert accepted_as("tech1", PASSCODE) == {CTImageStorage}
    assert accepted_as("rad1", PASSCODE + "!") == {StudyRootQueryRetrieveInformationModelFind}


def test_a_token_without_the_write_scopes_may_search_but_not_store(
    tmp_path: Path, provider: OidcProvider, gateway: Callable[..., Gateway]
) -> None:
    """As on the facade, where STOW-RS needs ``write_scopes``: a token without them gets
    its storage contexts rejected (storescu stores nothing) and its search accepted; a
    token with them stores."""
    from pynetdicom.sop_class import CTImageStorage

    gw = gateway(
        extra=(
            "\n[dimse.user_identity]\njwt = true\n"
            f'\n[http.auth.oidc]\nissuer = "{provider.issuer}"\naudience = "dicom-gateway"\n'
            'required_scopes = ["dicom.read"]\nwrite_scopes = ["dicom.write"]\n'
        ),
    )
    files = ct_series(tmp_path / "ct", 1, rows=16, columns=16)
    reader, writer = tmp_path / "reader.jwt", tmp_path / "writer.jwt"
    reader.write_text(provider.token("viewer"))  # scope "openid profile dicom.read"
    writer.write_text(provider.token("tech2", scope="openid dicom.read dicom.write"))

    refused = dcmtk.storescu(gw.port, files, gw.ae_title, extra_args=["--jwt", str(reader)])
    assert refused.returncode != 0 and "No Acceptable Presentation Contexts" in refused.stderr, refused.stderr
    stored = dcmtk.storescu(gw.port, files, gw.ae_title, extra_args=["--jwt", str(writer)])
    assert stored.returncode == 0, stored.stderr
    gw.wait_counts(delivered=1)

    ae = AE(ae_title="WS1")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(CTImageStorage)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 5
    identity.primary_field = reader.read_text().encode()
    assoc = ae.associate("127.0.0.1", gw.port, ae_title=gw.ae_title, ext_neg=[identity])
    assert assoc.is_established
    assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {StudyRootQueryRetrieveInformationModelFind}
    query = Dataset()
    query.QueryRetrieveLevel, query.StudyInstanceUID = "STUDY", ""
    found = [ds for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if status and status.Status == 0xFF00]
    assoc.release()
    assert [ds.StudyInstanceUID for ds in found] == [pydicom.dcmread(files[0]).StudyInstanceUID]
    assert "user viewer (JSON Web Token, no store)" in gw.log() and "user tech2 (JSON Web Token)" in gw.log()
