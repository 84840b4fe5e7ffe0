"""User Identity Negotiation: the sub-items on the wire (checked against pynetdicom's
own encoding of them) and the gateway's decision on each kind of identity."""

from __future__ import annotations

import asyncio
import struct

import pytest
from pynetdicom.pdu_items import UserIdentitySubItemAC, UserIdentitySubItemRQ
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from gateway.config import Peer, UserIdentityConfig
from gateway.dimse import pdu
from gateway.dimse.identity import RJ_IDENTITY, RJ_IDENTITY_TRANSIENT, ProviderUnavailable, TokenUser, check_identity

CONTEXT = pdu.PresentationContextRQ(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])


def _rq_with(item: bytes) -> pdu.AssociateRQ:
    """An A-ASSOCIATE-RQ body carrying ``item`` in its user information."""
    encoded = pdu.encode_associate_rq("GW", "WS1", [CONTEXT], 16384, "1.2.3", "TEST")
    body = bytearray(encoded[6:])
    start = body.index(b"\x50\x00")  # the user information item
    (length,) = struct.unpack_from(">H", body, start + 2)
    body[start + 2 : start + 4] = struct.pack(">H", length + len(item))
    body[start + 4 + length : start + 4 + length] = item
    return pdu.parse_associate_rq(bytes(body))


def _pynetdicom_rq(kind: int, primary: bytes, secondary: bytes = b"", positive: bool = True) -> bytes:
    primitive = UserIdentityNegotiation()
    primitive.user_identity_type = kind
    primitive.positive_response_requested = positive
    primitive.primary_field = primary
    if secondary:
        primitive.secondary_field = secondary
    item = UserIdentitySubItemRQ()
    item.from_primitive(primitive)
    return item.encode()


def test_the_request_sub_item_reads_as_pynetdicom_writes_it() -> None:
    rq = _rq_with(_pynetdicom_rq(2, "técnico".encode(), b"s3cret"))
    assert rq.user_identity == pdu.UserIdentity(2, True, "técnico".encode(), b"s3cret")
    assert "s3cret" not in repr(rq.user_identity)
    token = b"eyJhbGciOiJSUzI1NiJ9." + b"x" * 900 + b".sig"
    assert _rq_with(_pynetdicom_rq(5, token, positive=False)).user_identity == pdu.UserIdentity(5, False, token, b"")
    assert _rq_with(b"").user_identity is None


@pytest.mark.parametrize("item", [
    b"\x58\x00\x00\x03\x02\x01\x00",  # shorter than its fixed fields
    b"\x58\x00\x00\x06\x02\x01\x00\x09ab",  # primary field longer than the item
    b"\x58\x00\x00\x0a\x02\x01\x00\x02ab\x00\x09cd",  # secondary field longer than the item
])
def test_a_malformed_identity_sub_item_is_a_malformed_pdu(item: bytes) -> None:
    with pytest.raises(pdu.PDUError):
        _rq_with(item)


def test_the_reply_is_what_pynetdicom_reads_as_one() -> None:
    rq = _rq_with(_pynetdicom_rq(2, b"tech1", b"pw"))
    ac = pdu.encode_associate_ac(rq, [pdu.PresentationContextAC(1, 0, "1.2.840.10008.1.2")], 16384, "1.2.3", "GW", (), b"")
    start = ac.index(b"\x59\x00")
    reply = UserIdentitySubItemAC()
    reply.decode(ac[start : start + 6])
    assert reply.server_response_length == 0 and reply.server_response == b""
    assert b"\x59\x00" not in pdu.encode_associate_ac(rq, [], 16384, "1.2.3", "GW")


def test_the_gateway_names_its_user_in_its_own_requests() -> None:
    identity = pdu.UserIdentity(2, False, b"gateway-a", b"s3cret")
    encoded = pdu.encode_associate_rq("PACS", "GW", [CONTEXT], 16384, "1.2.3", "TEST", [], identity)
    assert pdu.parse_associate_rq(encoded[6:]).user_identity == identity
    start = encoded.index(b"\x58\x00")
    item = UserIdentitySubItemRQ()
    item.decode(encoded[start:])
    assert (item.user_identity_type, item.primary_field, item.secondary_field) == (2, b"gateway-a", b"s3cret")
    assert pdu.parse_associate_rq(pdu.encode_associate_rq("PACS", "GW", [CONTEXT], 16384, "1.2.3", "TEST")[6:]).user_identity is None


USERS = UserIdentityConfig(users=(("tech1", "s3cret"),), jwt=True)
WS1 = Peer("WS1", "127.0.0.1", 104, require_user_identity=True)
MODALITY = Peer("CT1", "127.0.0.1", 104)


async def _alice(token: str) -> TokenUser | None:
    if token == "down":
        raise ProviderUnavailable("the provider's keys cannot be fetched")
    if token == "read-only":  # valid, without the facade's write scopes
        return TokenUser("bob", may_store=False)
    return TokenUser("alice") if token == "good" else None


def _check(asked: pdu.UserIdentity | None, cfg: UserIdentityConfig = USERS, peer: Peer | None = MODALITY):
    return asyncio.run(check_identity(asked, cfg, peer, _alice))


def test_passcodes_and_tokens_are_checked() -> None:
    ok = _check(pdu.UserIdentity(2, True, b"tech1", b"s3cret"))
    assert ok.refusal is None and ok.identity is not None and ok.identity.user == "tech1" and ok.identity.verified
    assert ok.reply == b""  # asked for: zero length (PS3.7 D.3.3.7.2)
    assert _check(pdu.UserIdentity(2, False, b"tech1", b"s3cret")).reply is None
    for wrong in (pdu.UserIdentity(2, True, b"tech1", b"guess"), pdu.UserIdentity(2, True, b"nobody", b"s3cret")):
        refused = _check(wrong)
        assert refused.refusal is not None and refused.refusal.code == RJ_IDENTITY and "s3cret" not in refused.refusal.why
    token = _check(pdu.UserIdentity(5, True, b"good"))
    assert token.identity is not None and token.identity.user == "alice" and token.reply is None
    assert not token.identity.denied
    reader = _check(pdu.UserIdentity(5, True, b"read-only")).identity
    assert reader is not None and reader.denied == {"store"} and reader.describe() == "user bob (JSON Web Token, no store)"
    assert _check(pdu.UserIdentity(5, True, b"forged")).refusal.code == RJ_IDENTITY
    assert _check(pdu.UserIdentity(5, True, b"down")).refusal.code == RJ_IDENTITY_TRANSIENT


def test_what_is_required_and_what_is_ignored() -> None:
    assert _check(None).identity is None and _check(None).refusal is None  # not required of a modality
    assert _check(None, peer=WS1).refusal is not None  # required of this peer
    assert _check(None, UserIdentityConfig(users=USERS.users, required=True), None).refusal is not None
    claimed = _check(pdu.UserIdentity(1, True, b"nurse"))
    assert claimed.identity is not None and not claimed.identity.verified and claimed.reply is None
    assert _check(pdu.UserIdentity(1, False, b"nurse"), peer=WS1).refusal is not None  # a name proves nothing
    assert _check(pdu.UserIdentity(3, False, b"ticket")).identity is None  # Kerberos: ignored...
    assert _check(pdu.UserIdentity(3, False, b"ticket"), peer=WS1).refusal is not None  # ...unless required
    off = UserIdentityConfig()  # nothing configured: the sub-item is ignored, as before
    assert _check(pdu.UserIdentity(2, True, b"tech1", b"guess"), off, WS1).refusal is None
    no_jwt = UserIdentityConfig(users=USERS.users)
    assert _check(pdu.UserIdentity(5, True, b"forged"), no_jwt).refusal is None  # tokens not checked: ignored
