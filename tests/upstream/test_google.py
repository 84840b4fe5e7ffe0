"""Google credentials (gateway.upstream.google) against a token endpoint answering as
Google's does: a service account's RS256 assertion verified with its public key
(tests.support.googleidp). The metadata server path runs in the daemon
(tests/integration/test_upstream_oauth.py): google-auth reads its address at import."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.upstream.errors import UpstreamAuthError, UpstreamUnavailable
from gateway.upstream.google import GoogleCredentials
from gateway.upstream.http import SignableRequest
from tests.support.googleidp import GoogleIdp

REQUEST = SignableRequest("GET", "https://healthcare.googleapis.com/v1/x/dicomWeb/studies", {}, None)  # type: ignore[arg-type]


@pytest.fixture
def idp() -> Iterator[GoogleIdp]:
    server = GoogleIdp(audience="https://archive.example").start()
    yield server
    server.stop()


def test_a_service_account_key_gets_a_scoped_token_renewed_before_expiry(idp: GoogleIdp, tmp_path: Path) -> None:
    signer = GoogleCredentials(str(idp.service_account_file(tmp_path / "sa.json")))
    headers = asyncio.run(signer(REQUEST))
    assert headers["Authorization"].startswith("Bearer ey") and idp.requests == [("token", 200, "")]
    # one hour announced: renewed 5 minutes before it ends
    assert signer._token is not None and 3290 < signer._token.renew_at - time.monotonic() <= 3300


def test_a_key_google_does_not_know_is_refused_in_words(idp: GoogleIdp, tmp_path: Path) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = GoogleCredentials(str(idp.service_account_file(tmp_path / "sa.json", key=other)))
    with pytest.raises(UpstreamAuthError) as info:
        asyncio.run(signer.token())
    assert str(info.value) == "Google refused the gateway's credentials: invalid_grant: Invalid JWT Signature.; check upstream.auth"
    assert "PRIVATE KEY" not in str(info.value)


def test_the_token_service_down_is_transient(idp: GoogleIdp, tmp_path: Path) -> None:
    signer = GoogleCredentials(str(idp.service_account_file(tmp_path / "sa.json")))
    idp.stop()
    with pytest.raises(UpstreamUnavailable, match="token service unreachable"):
        asyncio.run(signer.token())
