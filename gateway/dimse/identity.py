"""User Identity Negotiation (PS3.7 D.3.3.7): which user an association acts for.

AE titles, addresses and TLS certificates name a node, not a person; a workstation
that lets several radiologists query and retrieve, or a security review asking "who
moved this study", needs the user. The requestor names one in its A-ASSOCIATE-RQ: a
user name and passcode (checked against ``[dimse.user_identity] users``), or a JSON
Web Token (checked, with ``jwt = true``, like the facade's bearer tokens against
``[http.auth.oidc]``'s provider). The accepted user goes into the log line of the
association and into every audit message it causes.

An acceptor that does not negotiate user identity ignores the sub-item; so does the
gateway until ``[dimse.user_identity]`` names users or turns ``jwt`` on. From then on a
passcode or token it checks and cannot accept is rejected (an association naming a
user asks to act as that user), and with ``required`` (or a peer's
``require_user_identity``) so is an association naming no user it accepts. A bare
user name (type 1) proves nothing: it is recorded as claimed, gets no positive
response, and never satisfies ``required``. Kinds the gateway does not check
(Kerberos tickets, SAML assertions, and a passcode or token while no users or
``jwt`` are configured) are ignored unless an identity is required.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gateway.config import Peer, UserIdentityConfig
from gateway.dimse.pdu import UserIdentity

USERNAME, PASSCODE, KERBEROS, SAML, JWT = 1, 2, 3, 4, 5
KINDS = {USERNAME: "user name", PASSCODE: "user name and passcode", KERBEROS: "Kerberos ticket", SAML: "SAML assertion", JWT: "JSON Web Token"}

# A-ASSOCIATE-RJ (result, source, reason) for an identity not accepted: rejected
# permanent, by the DICOM UL service provider's ACSE function, no reason given; while
# the provider's keys cannot be fetched, transient (the same token may pass later).
RJ_IDENTITY = (1, 2, 1)
RJ_IDENTITY_TRANSIENT = (2, 2, 1)


class ProviderUnavailable(Exception):
    """The identity provider's keys cannot be had now: a token can be checked neither way."""


@dataclass(frozen=True)
class TokenUser:
    """Whom a valid JSON Web Token names, and whether it grants the facade's write
    scopes (``http.auth.oidc.write_scopes``): a token that may not store by STOW-RS
    may not by C-STORE either."""

    user: str
    may_store: bool = True


# The user a JSON Web Token names, None when it is not valid for the gateway; raises
# ProviderUnavailable. (The daemon passes the facade's OpenID Connect check.)
TokenCheck = Callable[[str], Awaitable[TokenUser | None]]


@dataclass(frozen=True)
class Identity:
    """Whom an association acts for: ``verified`` by passcode or token, or only claimed."""

    user: str
    kind: str
    verified: bool
    denied: frozenset[str] = frozenset()  # permissions its credential withholds

    def describe(self) -> str:
        denied = f", no {'/'.join(sorted(self.denied))}" if self.denied else ""
        return f"user {self.user} ({self.kind}{'' if self.verified else ', not verified'}{denied})"


@dataclass(frozen=True)
class Refusal:
    """Why an association's identity is not accepted: the A-ASSOCIATE-RJ and the words."""

    code: tuple[int, int, int]
    why: str


@dataclass(frozen=True)
class Outcome:
    """What the check decided: a refusal, or the identity (None: none named or ignored)
    and the User Identity reply to put in the A-ASSOCIATE-AC (None: no reply)."""

    refusal: Refusal | None = None
    identity: Identity | None = None
    reply: bytes | None = None


def _name(raw: bytes) -> str:
    """A user name as sent (UTF-8), printable for a log line."""
    return raw.decode("utf-8", "replace").strip()[:128]


async def check_identity(
    asked: UserIdentity | None, cfg: UserIdentityConfig, peer: Peer | None, token_user: TokenCheck | None
) -> Outcome:
    """Decide on the user an A-ASSOCIATE-RQ names (``asked``), for the calling ``peer``."""
    if not cfg.enabled:
        return Outcome()
    required = cfg.required or (peer is not None and peer.require_user_identity)
    if asked is None:
        if required:
            return Outcome(Refusal(RJ_IDENTITY, "no user identity (one is required)"))
        return Outcome()
    kind = KINDS.get(asked.type, f"identity type {asked.type}")
    if asked.type == PASSCODE and cfg.users:
        user = _name(asked.primary)
        known = dict(cfg.users).get(user)
        # compared in constant time, and against something even for an unknown user
        good = hmac.compare_digest((known or "\x00").encode("utf-8"), asked.secondary) and known is not None
        if not good:
            return Outcome(Refusal(RJ_IDENTITY, f"user {user!r}: unknown user or wrong passcode"))
        return Outcome(identity=Identity(user, kind, True), reply=b"" if asked.positive_response else None)
    if asked.type == JWT and cfg.jwt and token_user is not None:
        try:
            found = await token_user(asked.primary.decode("ascii", "replace").strip())
        except ProviderUnavailable as exc:
            return Outcome(Refusal(RJ_IDENTITY_TRANSIENT, f"JSON Web Token not checked: {exc}"))
        if found is None:
            return Outcome(Refusal(RJ_IDENTITY, "JSON Web Token not valid for the gateway"))
        return Outcome(identity=Identity(found.user, kind, True, frozenset() if found.may_store else frozenset({"store"})))
    if asked.type == USERNAME and _name(asked.primary):
        if required:
            return Outcome(Refusal(RJ_IDENTITY, f"user {_name(asked.primary)!r} named without a passcode (one that is verified is required)"))
        return Outcome(identity=Identity(_name(asked.primary), kind, False))
    if required:
        return Outcome(Refusal(RJ_IDENTITY, f"{kind} not accepted (a user name and passcode{' or a JSON Web Token' if cfg.jwt else ''} is)"))
    return Outcome()
