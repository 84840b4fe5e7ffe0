"""Who may call the emulator: long-term access keys and short-lived session credentials.

Long-term keys are registered with `Identities.add`. Session credentials (what a
``credential_process``, STS or an instance role hands out) are derived from a master
secret instead of being stored, so that a separate process (``credproc.py``, run by
botocore inside the daemon) can issue them without talking to the emulator: the
session token carries the access key and its expiry, sealed with an HMAC under the
master secret, and the secret key is an HMAC of the access key. Only the standard
library is used here because ``credproc.py`` imports this module on its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass


class AuthFailure(Exception):
    """A request AWS would refuse before looking at it: status, x-amzn-ErrorType, message."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


INVALID_TOKEN = AuthFailure(403, "UnrecognizedClientException", "The security token included in the request is invalid.")
EXPIRED_TOKEN = AuthFailure(403, "ExpiredTokenException", "The security token included in the request is expired")


@dataclass(frozen=True)
class Secret:
    """The secret half of an access key, and the session token it requires (if any)."""

    secret_key: str
    session_token: str | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _session_secret(master: bytes, access_key: str) -> str:
    return _b64(hmac.new(master, b"secret/" + access_key.encode(), hashlib.sha256).digest())[:40]


def session_credentials(master: bytes, ttl: float, now: float | None = None) -> dict[str, str]:
    """Fresh session credentials valid for ``ttl`` seconds, in the JSON shape of a
    ``credential_process`` (Version 1)."""
    issued = time.time() if now is None else now
    access_key = "ASIA" + secrets.token_hex(8).upper()
    expiry = issued + ttl
    payload = _b64(json.dumps({"k": access_key, "exp": expiry}).encode())
    seal = hmac.new(master, payload.encode(), hashlib.sha256).hexdigest()
    return {
        "Version": 1,  # type: ignore[dict-item]
        "AccessKeyId": access_key,
        "SecretAccessKey": _session_secret(master, access_key),
        "SessionToken": f"{payload}.{seal}",
        "Expiration": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)),
    }


class Identities:
    """The credentials the emulator accepts."""

    def __init__(self, master: bytes | None = None) -> None:
        self.master = master if master is not None else secrets.token_bytes(32)
        self._keys: dict[str, Secret] = {}

    def add(self, access_key: str, secret_key: str, session_token: str | None = None) -> None:
        """Accept a long-term key (or a fixed session) from now on."""
        self._keys[access_key] = Secret(secret_key, session_token)

    def secret_for(self, access_key: str, token: str | None, now: float) -> str:
        """The secret key to verify a signature with; raises AuthFailure as AWS would:
        an unknown key or a wrong token is an invalid token, an old one expired."""
        known = self._keys.get(access_key)
        if known is not None:
            if known.session_token is not None and token != known.session_token:
                raise INVALID_TOKEN
            return known.secret_key
        if not access_key.startswith("ASIA") or not token or token.count(".") != 1:
            raise INVALID_TOKEN
        payload, seal = token.split(".")
        expected = hmac.new(self.master, payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(seal, expected):
            raise INVALID_TOKEN
        try:
            claims = json.loads(_unb64(payload))
        except ValueError:
            raise INVALID_TOKEN from None
        if claims.get("k") != access_key:
            raise INVALID_TOKEN
        if float(claims.get("exp", 0)) <= now:
            raise EXPIRED_TOKEN
        return _session_secret(self.master, access_key)
