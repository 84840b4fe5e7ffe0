"""DICOM Upper Layer PDUs (PS3.8 section 9.3): parsing and encoding.

Pure functions over bytes, for both roles. The acceptor reads an A-ASSOCIATE-RQ and
answers with A-ASSOCIATE-AC or -RJ; the requestor (C-MOVE sub-operations) builds the
RQ and reads the AC or RJ. Both split and build P-DATA-TF, and the release and abort
PDUs. Parsing is strict about lengths: a PDU whose items run past
its end raises `PDUError`, which the association turns into an A-ABORT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPTED = 0
PC_USER_REJECTED = 1
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 4


class PDUError(ValueError):
    """A malformed PDU: the association must be aborted."""


@dataclass
class PresentationContextRQ:
    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class RoleSelection:
    sop_class_uid: str
    scu_role: bool
    scp_role: bool


@dataclass(frozen=True)
class UserIdentity:
    """A User Identity Negotiation sub-item of an A-ASSOCIATE-RQ (PS3.7 D.3.3.7): its
    type (1 user name, 2 user name and passcode, 3 Kerberos ticket, 4 SAML assertion,
    5 JSON Web Token), whether the requestor asks for a positive response, and its two
    fields as sent (the user name, the passcode, the token...)."""

    type: int
    positive_response: bool
    primary: bytes
    secondary: bytes = field(default=b"", repr=False)  # a passcode never reaches a log line


@dataclass
class AssociateRQ:
    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[PresentationContextRQ] = field(default_factory=list)
    max_pdu_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    roles: list[RoleSelection] = field(default_factory=list)
    user_identity: UserIdentity | None = None


@dataclass
class PresentationContextAC:
    id: int
    result: int
    transfer_syntax: str


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace").strip()


def _items(data: bytes, offset: int, end: int) -> list[tuple[int, bytes]]:
    """Split a run of (type, reserved, length16, value) items."""
    out = []
    while offset < end:
        if offset + 4 > end:
            raise PDUError("item header runs past the end of the PDU")
        item_type, _, length = struct.unpack_from(">BBH", data, offset)
        offset += 4
        if offset + length > end:
            raise PDUError(f"item 0x{item_type:02x} runs past the end of the PDU")
        out.append((item_type, data[offset : offset + length]))
        offset += length
    return out


def parse_associate_rq(body: bytes) -> AssociateRQ:
    """Parse the body (after the 6-byte PDU header) of an A-ASSOCIATE-RQ."""
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE-RQ shorter than its fixed fields")
    called = body[4:20].decode("ascii", "replace").strip()
    calling = body[20:36].decode("ascii", "replace").strip()
    rq = AssociateRQ(called_ae=called, calling_ae=calling)
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x10:
            rq.application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise PDUError("presentation context item too short")
            pc = PresentationContextRQ(id=value[0], abstract_syntax="", transfer_syntaxes=[])
            for sub_type, sub in _items(value, 4, len(value)):
                if sub_type == 0x30:
                    pc.abstract_syntax = _uid(sub)
                elif sub_type == 0x40:
                    pc.transfer_syntaxes.append(_uid(sub))
            rq.contexts.append(pc)
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0, len(value)):
                if sub_type == 0x51 and len(sub) == 4:
                    rq.max_pdu_length = struct.unpack(">I", sub)[0]
                elif sub_type == 0x52:
                    rq.implementation_class_uid = _uid(sub)
                elif sub_type == 0x55:
                    rq.implementation_version_name = sub.decode("ascii", "replace").strip()
                elif sub_type == 0x54 and len(sub) >= 4:
                    (uid_len,) = struct.unpack_from(">H", sub, 0)
                    if 2 + uid_len + 2 > len(sub):
                        raise PDUError("role selection item too short")
                    uid = _uid(sub[2 : 2 + uid_len])
                    rq.roles.append(RoleSelection(uid, bool(sub[2 + uid_len]), bool(sub[3 + uid_len])))
                elif sub_type == 0x58:
                    rq.user_identity = _user_identity(sub)
    if not rq.contexts:
        raise PDUError("A-ASSOCIATE-RQ without presentation contexts")
    return rq


def _user_identity(sub: bytes) -> UserIdentity:
    """The value of a 0x58 sub-item: type, positive-response flag, then the primary
    and secondary fields, each after its 2-byte length."""
    if len(sub) < 4:
        raise PDUError("user identity item too short")
    (primary_len,) = struct.unpack_from(">H", sub, 2)
    end = 4 + primary_len
    if end + 2 > len(sub):
        raise PDUError("user identity item shorter than its primary field")
    (secondary_len,) = struct.unpack_from(">H", sub, end)
    if end + 2 + secondary_len > len(sub):
        raise PDUError("user identity item shorter than its secondary field")
    return UserIdentity(sub[0], bool(sub[1]), sub[4:end], sub[end + 2 : end + 2 + secondary_len])


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


# The smallest maximum PDU length a peer may announce, as requestor (A-ASSOCIATE-RQ)
# or acceptor (-AC). Every byte beyond it costs a PDU and a PDV header of 12 bytes: a
# peer announcing 7 bytes had each 512 KB instance of a C-GET cut into 524,288 PDUs,
# 0.24 s of the event loop, which every association shares. dcmtk goes no lower than
# 4096.
MIN_PEER_PDU = 1024


def encode_associate_ac(
    rq: AssociateRQ,
    contexts: list[PresentationContextAC],
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    roles: list[RoleSelection] = (),  # type: ignore[assignment]
    identity_response: bytes | None = None,
) -> bytes:
    """A-ASSOCIATE-AC echoing the request's AE titles (PS3.8 9.3.3); with
    ``identity_response``, a User Identity Negotiation reply (0x59) holding it (empty
    for an accepted user name and passcode, PS3.7 D.3.3.7.2)."""
    body = struct.pack(">HH", 1, 0) + _ae(rq.called_ae) + _ae(rq.calling_ae) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for pc in contexts:
        ts = _item(0x40, pc.transfer_syntax.encode())
        body += _item(0x21, bytes([pc.id, 0, pc.result, 0]) + ts)
    user = _item(0x51, struct.pack(">I", max_pdu_length))
    user += _item(0x52, implementation_class_uid.encode())
    for role in roles:
        uid = role.sop_class_uid.encode()
        user += _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([role.scu_role, role.scp_role]))
    user += _item(0x55, implementation_version_name.encode()[:16])
    if identity_response is not None:
        user += _item(0x59, struct.pack(">H", len(identity_response)) + identity_response)
    body += _item(0x50, user)
    return _pdu(A_ASSOCIATE_AC, body)


def _encode_roles(roles: list[RoleSelection] | tuple[RoleSelection, ...]) -> bytes:
    out = b""
    for role in roles:
        uid = role.sop_class_uid.encode()
        out += _item(0x54, struct.pack(">H", len(uid)) + uid + bytes([role.scu_role, role.scp_role]))
    return out


def encode_associate_rq(
    called_ae: str,
    calling_ae: str,
    contexts: list[PresentationContextRQ],
    max_pdu_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    roles: list[RoleSelection] = (),  # type: ignore[assignment]
    identity: UserIdentity | None = None,
) -> bytes:
    """A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing ``contexts`` (odd ids, at most 128),
    naming ``identity``'s user when given (PS3.7 D.3.3.7)."""
    if not contexts or len(contexts) > 128:
        raise ValueError(f"{len(contexts)} presentation contexts; 1 to 128 allowed")
    body = struct.pack(">HH", 1, 0) + _ae(called_ae) + _ae(calling_ae) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for pc in contexts:
        sub = _item(0x30, pc.abstract_syntax.encode())
        sub += b"".join(_item(0x40, ts.encode()) for ts in pc.transfer_syntaxes)
        body += _item(0x20, bytes([pc.id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu_length))
    user += _item(0x52, implementation_class_uid.encode())
    user += _encode_roles(roles)
    user += _item(0x55, implementation_version_name.encode()[:16])
    if identity is not None:
        user += _item(0x58, bytes([identity.type, identity.positive_response]) + b"".join(
            struct.pack(">H", len(value)) + value for value in (identity.primary, identity.secondary)
        ))
    body += _item(0x50, user)
    return _pdu(A_ASSOCIATE_RQ, body)


@dataclass
class AssociateAC:
    """What the acceptor agreed to: one result per proposed context, and its limits."""

    contexts: list[PresentationContextAC] = field(default_factory=list)
    max_pdu_length: int = 0
    implementation_class_uid: str = ""
    roles: list[RoleSelection] = field(default_factory=list)


def _user_information(value: bytes, into: AssociateAC | AssociateRQ) -> None:
    for sub_type, sub in _items(value, 0, len(value)):
        if sub_type == 0x51 and len(sub) == 4:
            into.max_pdu_length = struct.unpack(">I", sub)[0]
        elif sub_type == 0x52:
            into.implementation_class_uid = _uid(sub)
        elif sub_type == 0x54 and len(sub) >= 4:
            (uid_len,) = struct.unpack_from(">H", sub, 0)
            if 2 + uid_len + 2 > len(sub):
                raise PDUError("role selection item too short")
            uid = _uid(sub[2 : 2 + uid_len])
            into.roles.append(RoleSelection(uid, bool(sub[2 + uid_len]), bool(sub[3 + uid_len])))


def parse_associate_ac(body: bytes) -> AssociateAC:
    """Parse the body (after the 6-byte PDU header) of an A-ASSOCIATE-AC."""
    if len(body) < 68:
        raise PDUError("A-ASSOCIATE-AC shorter than its fixed fields")
    ac = AssociateAC()
    for item_type, value in _items(body, 68, len(body)):
        if item_type == 0x21:
            if len(value) < 4:
                raise PDUError("presentation context item too short")
            ts = ""
            for sub_type, sub in _items(value, 4, len(value)):
                if sub_type == 0x40:
                    ts = _uid(sub)
            ac.contexts.append(PresentationContextAC(value[0], value[2], ts))
        elif item_type == 0x50:
            _user_information(value, ac)
    return ac


def parse_associate_rj(body: bytes) -> tuple[int, int, int]:
    """(result, source, reason) of an A-ASSOCIATE-RJ."""
    if len(body) < 4:
        raise PDUError("A-ASSOCIATE-RJ shorter than its fixed fields")
    return body[1], body[2], body[3]


def encode_release_rq() -> bytes:
    return _pdu(A_RELEASE_RQ, b"\x00" * 4)


def encode_associate_rj(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ: result 1 permanent / 2 transient; source and reason per PS3.8 9.3.4."""
    return _pdu(A_ASSOCIATE_RJ, bytes([0, result, source, reason]))


def encode_release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, b"\x00" * 4)


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT; source 2 is the service provider, 0 the service user."""
    return _pdu(A_ABORT, bytes([0, 0, source, reason]))


def parse_pdata(body: bytes) -> list[tuple[int, int, memoryview]]:
    """Split a P-DATA-TF body into (context id, control header, fragment) PDVs."""
    out = []
    view = memoryview(body)
    offset, end = 0, len(body)
    while offset < end:
        if offset + 6 > end:
            raise PDUError("PDV header runs past the end of the P-DATA-TF")
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > end:
            raise PDUError("PDV length inconsistent with the P-DATA-TF")
        out.append((body[offset + 4], body[offset + 5], view[offset + 6 : offset + 4 + length]))
        offset += 4 + length
    return out


def encode_pdata(context_id: int, payload: bytes, is_command: bool, max_pdu_length: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying one message part, fragmented to the peer's maximum."""
    # A PDV item adds 6 bytes (length + context id + control header) inside the PDU.
    limit = (max_pdu_length - 6) if max_pdu_length else (1 << 20)
    limit = max(limit, 1)
    pdus = []
    offset = 0
    while True:
        chunk = payload[offset : offset + limit]
        offset += len(chunk)
        last = offset >= len(payload)
        control = (1 if is_command else 0) | (2 if last else 0)
        pdv = struct.pack(">IBB", len(chunk) + 2, context_id, control) + chunk
        pdus.append(_pdu(P_DATA_TF, pdv))
        if last:
            return pdus
