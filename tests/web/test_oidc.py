"""The facade's check of an OpenID provider's access tokens (gateway.web.oidc) against a
provider publishing its keys as Keycloak does (tests.support.oidc): what is admitted,
what is refused, and how often the provider is asked."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.config import OidcConfig
from gateway.web.oidc import KeysUnavailable, TokenVerifier
from tests.support.oidc import OidcProvider


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def provider() -> Iterator[OidcProvider]:
    server = OidcProvider(audience="dicom-gateway").start()
    yield server
    server.stop()


def verifier(provider: OidcProvider, clock: Clock | None = None, **cfg: object) -> TokenVerifier:
    config = OidcConfig(issuer=provider.issuer, audience=("dicom-gateway",), **cfg)  # type: ignore[arg-type]
    return TokenVerifier(config, clock=clock or Clock())


def check(v: TokenVerifier, token: str) -> str | None:
    return asyncio.run(v.user(token))


def test_a_valid_token_names_its_user_and_keys_come_from_discovery(provider: OidcProvider) -> None:
    v = verifier(provider)
    assert check(v, provider.token("alice")) == "alice"
    assert check(v, provider.token("bob")) == "bob"
    assert provider.fetches == [f"{provider.path}/.well-known/openid-configuration", f"{provider.path}/protocol/openid-connect/certs"]


@pytest.mark.parametrize(
    "claims",
    [
        {"aud": "another-application"},
        {"iss": "http://127.0.0.1:1/realms/elsewhere"},
        {"exp": -120},  # expired beyond the 60 s leeway (seconds from now)
        {"nbf": 600},  # not valid yet (seconds from now)
        {"scope": "openid profile"},  # lacks dicom.read
    ],
    ids=["audience", "issuer", "expired", "not-yet-valid", "scope"],
)
def test_tokens_not_for_the_facade_are_refused(provider: OidcProvider, claims: dict[str, object]) -> None:
    v = verifier(provider, required_scopes=("dicom.read",))
    assert check(v, provider.token("alice")) == "alice"
    now = int(time.time())  # at the test, not at collection: a full run takes minutes to get here
    timed = {key: now + value if key in ("exp", "nbf") else value for key, value in claims.items()}  # type: ignore[operator]
    assert check(v, provider.token("mallory", **timed)) is None


def test_entra_ids_scp_and_roles_claims_carry_permissions(provider: OidcProvider) -> None:
    v = verifier(provider, required_scopes=("DICOM.Read",), write_scopes=("DICOM.Write",))
    assert check(v, provider.token("alice", scope=None, scp="DICOM.Read")) == "alice"
    app = asyncio.run(v.admit(provider.token("ai-node", scope=None, roles=["DICOM.Read", "DICOM.Write"])))
    assert app is not None and v.may_write(app)
    reader = asyncio.run(v.admit(provider.token("alice", scope=None, scp="DICOM.Read")))
    assert reader is not None and not v.may_write(reader)


def test_forged_signatures_are_refused(provider: OidcProvider) -> None:
    """A key the provider does not publish; the provider's public key used as an HMAC
    secret (the algorithm confusion attack); no signature at all."""
    v = verifier(provider)
    own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert check(v, provider.token("mallory", key=own)) is None
    public = provider.keys[provider.signing_kid].public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = jwt.decode(provider.token("mallory"), options={"verify_signature": False})
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": provider.signing_kid}).encode()).rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(public, header + b"." + body, hashlib.sha256).digest()).rstrip(b"=")
    assert check(v, (header + b"." + body + b"." + signature).decode()) is None
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": provider.signing_kid})
    assert check(v, unsigned) is None
    assert check(v, "not-a-jwt") is None
    # an EC signature claimed with the provider's RSA key ID; a key ID that is no string
    ec = jwt.encode(claims, ec_key(), algorithm="ES256", headers={"kid": provider.signing_kid})
    assert check(v, ec) is None
    odd_header = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": ["a", "list"]}).encode()).rstrip(b"=")
    assert check(v, (odd_header + b"." + body + b".c2ln").decode()) is None


def test_rotated_keys_are_fetched_once_and_unknown_key_ids_at_most_once_a_minute(provider: OidcProvider) -> None:
    clock = Clock()
    v = verifier(provider, clock)
    assert check(v, provider.token("alice")) == "alice"
    provider.rotate()
    clock.now += 61
    assert check(v, provider.token("alice")) == "alice"  # new kid: keys fetched again
    fetched = len(provider.fetches)
    forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    for n in range(20):  # forged key IDs: no storm of fetches
        assert check(v, provider.token("mallory", kid=f"forged-{n}", key=forger)) is None
    assert len(provider.fetches) == fetched
    clock.now += 61
    assert check(v, provider.token("mallory", kid="forged-x", key=forger)) is None
    assert len(provider.fetches) == fetched + 2  # one more discovery and keys fetch


def test_a_provider_down_makes_tokens_uncheckable_not_invalid(provider: OidcProvider) -> None:
    clock = Clock()
    v = verifier(provider, clock)
    provider.down = True
    with pytest.raises(KeysUnavailable, match="HTTP 503"):
        check(v, provider.token("alice"))
    asked = len(provider.fetches)
    with pytest.raises(KeysUnavailable):  # within 5 s: not asked again
        check(v, provider.token("alice"))
    assert len(provider.fetches) == asked
    provider.down = False
    clock.now += 6
    assert check(v, provider.token("alice")) == "alice"


def test_an_admitted_token_is_remembered_until_it_expires(provider: OidcProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    """One signature check per token, not per request; again once its expiry passed."""
    decoded: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: object, **kwargs: object) -> object:
        decoded.append(token)
        return real(token, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting)
    clock = Clock()
    v = verifier(provider, clock)
    token = provider.token("alice", lifetime=300)
    assert [check(v, token) for _ in range(50)] == ["alice"] * 50 and len(decoded) == 1
    clock.now += 300 + 61  # past its expiry and the leeway on the gateway's clock
    check(v, token)
    assert len(decoded) == 2
