"""DIMSE command sets (PS3.7 section 9 and E.1): group 0000, always Implicit VR Little Endian.

Command sets are a few dozen bytes with a fixed vocabulary, so they are decoded and
encoded here directly rather than through a general data set parser.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

# Command Field values
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
# The Verification SOP Class, the abstract syntax of C-ECHO (PS3.4 A.4).
VERIFICATION = "1.2.840.10008.1.1"
# Storage Commitment Push Model SOP Class and its well-known instance (PS3.4 J.3.5).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"

NO_DATASET = 0x0101
HAS_DATASET = 0x0001

# Element number -> value kind. "U" unsigned short, "L" unsigned long, "S" string.
_KINDS: dict[int, str] = {
    0x0000: "L",  # CommandGroupLength
    0x0002: "S",  # AffectedSOPClassUID
    0x0003: "S",  # RequestedSOPClassUID
    0x0100: "U",  # CommandField
    0x0110: "U",  # MessageID
    0x0120: "U",  # MessageIDBeingRespondedTo
    0x0600: "S",  # MoveDestination
    0x0700: "U",  # Priority
    0x0800: "U",  # CommandDataSetType
    0x0900: "U",  # Status
    0x0901: "T",  # OffendingElement (AT, multi-valued)
    0x0902: "S",  # ErrorComment
    0x0903: "U",  # ErrorID
    0x1000: "S",  # AffectedSOPInstanceUID
    0x1001: "S",  # RequestedSOPInstanceUID
    0x1002: "U",  # EventTypeID
    0x1008: "U",  # ActionTypeID
    0x1020: "U",  # NumberOfRemainingSuboperations
    0x1021: "U",  # NumberOfCompletedSuboperations
    0x1022: "U",  # NumberOfFailedSuboperations
    0x1023: "U",  # NumberOfWarningSuboperations
    0x1030: "S",  # MoveOriginatorApplicationEntityTitle
    0x1031: "U",  # MoveOriginatorMessageID
}
_UID_ELEMENTS = {0x0002, 0x0003, 0x1000, 0x1001}


class CommandError(ValueError):
    """A command set that cannot be decoded."""


@dataclass
class Command:
    """A decoded command set: element number -> int or str."""

    values: dict[int, int | str | tuple[int, ...]] = field(default_factory=dict)

    def get(self, element: int, default: int | str | None = None):  # type: ignore[no-untyped-def]
        return self.values.get(element, default)

    @property
    def field(self) -> int:
        return int(self.values.get(0x0100, -1))  # type: ignore[arg-type]

    @property
    def message_id(self) -> int:
        return int(self.values.get(0x0110, 0))  # type: ignore[arg-type]

    @property
    def has_dataset(self) -> bool:
        return self.values.get(0x0800, NO_DATASET) != NO_DATASET


def decode_command(data: bytes) -> Command:
    """Decode an Implicit VR Little Endian group 0000 command set."""
    cmd = Command()
    offset, end = 0, len(data)
    while offset < end:
        if offset + 8 > end:
            raise CommandError("command element header truncated")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if offset + length > end:
            raise CommandError(f"command element (0000,{element:04X}) runs past the end")
        value = data[offset : offset + length]
        offset += length
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{element:04X}) outside the command group")
        kind = _KINDS.get(element)
        if kind == "U" and length == 2:
            cmd.values[element] = struct.unpack("<H", value)[0]
        elif kind == "L" and length == 4:
            cmd.values[element] = struct.unpack("<I", value)[0]
        elif kind == "S":
            cmd.values[element] = value.rstrip(b"\x00 ").decode("ascii", "replace").strip()
        elif kind == "T" and length % 4 == 0:
            cmd.values[element] = tuple(
                (g << 16) | e for g, e in struct.iter_unpack("<HH", value)
            )
    if 0x0100 not in cmd.values:
        raise CommandError("command set without CommandField")
    return cmd


def encode_command(values: dict[int, int | str | tuple[int, ...]]) -> bytes:
    """Encode a command set, computing CommandGroupLength."""
    body = b""
    for element in sorted(values):
        if element == 0x0000:
            continue
        value = values[element]
        kind = _KINDS[element]
        if kind == "U":
            raw = struct.pack("<H", int(value))  # type: ignore[arg-type]
        elif kind == "L":
            raw = struct.pack("<I", int(value))  # type: ignore[arg-type]
        elif kind == "T":
            raw = b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in value)  # type: ignore[union-attr,operator]
        else:
            raw = str(value).encode("ascii", "replace")
            if len(raw) % 2:
                raw += b"\x00" if element in _UID_ELEMENTS else b" "
        body += struct.pack("<HHI", 0x0000, element, len(raw)) + raw
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def response(
    request: Command,
    rsp_field: int,
    status: int,
    *,
    has_dataset: bool = False,
    extra: dict[int, int | str | tuple[int, ...]] | None = None,
) -> bytes:
    """The response to ``request`` with the usual echoed fields."""
    values: dict[int, int | str | tuple[int, ...]] = {
        0x0100: rsp_field,
        0x0120: request.message_id,
        0x0800: HAS_DATASET if has_dataset else NO_DATASET,
        0x0900: status,
    }
    sop_class = request.get(0x0002) or request.get(0x0003)
    if sop_class:
        values[0x0002] = sop_class
    sop_instance = request.get(0x1000)
    if sop_instance:
        values[0x1000] = sop_instance
    values.update(extra or {})
    return encode_command(values)
