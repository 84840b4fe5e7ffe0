"""The spool's on-disk record: a Part 10 file whose preamble says how long it is and
what its checksum is.

A C-STORE is written in place into a blank file (allocated and written before, see
`reserve`), so making it durable needs one ``fdatasync`` and no journal commit. The
price is that a file on disk may be longer than its instance (the blank's tail) or,
after a power cut, hold a mix of old and new bytes. The 128-byte preamble, which
PS3.10 7.1 leaves to the implementation, tells the cases apart:

* ``DGW-REC1``, length, CRC-32 of bytes 128..length, who sent it (an AE title, or
  STOW-RS and an address) and the AE title it was sent to: a sealed record. Written last, in the same ``fdatasync``
  as the data; a record whose checksum does not match was never acknowledged (or the
  disk corrupted it) and is never delivered. The sender lets start-up adopt a record
  whose row a power cut lost with the sender and called AE title that routes match
  on (records written before them have zeros there).
* ``DGW-BLNK``: a blank, or a receipt abandoned before it was sealed.
* anything else (zeros): a plain Part 10 file, as spools before records held.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from gateway.part10 import PREAMBLE

RECORD_MAGIC = b"DGW-REC1"
BLANK_MAGIC = b"DGW-BLNK"
_HEAD = struct.Struct("<8sQI64s16s")
BLANK_PREAMBLE = BLANK_MAGIC + bytes(PREAMBLE - len(BLANK_MAGIC))
_CHUNK = 1 << 20


def _fastest_crc32() -> Callable[[bytes | memoryview, int], int]:
    """libdeflate's CRC-32 as imagecodecs ships it (carry-less multiplication: 11 us
    for 512 KB here, zlib's takes 122 us, and every instance is summed when received
    and again before it leaves the spool), if it gives the standard check value;
    else zlib's. Both compute the same CRC-32, so records written by either verify."""
    try:
        from imagecodecs import deflate_crc32

        if deflate_crc32(b"123456789", 0) == 0xCBF43926:
            return deflate_crc32  # type: ignore[no-any-return,return-value]
    except Exception:  # noqa: BLE001 - an imagecodecs built without libdeflate
        pass
    return zlib.crc32


crc32 = _fastest_crc32()


class CorruptRecord(Exception):
    """A record's bytes do not match its checksum, or the file is shorter than it says."""


@dataclass(frozen=True)
class Sender:
    """Who sent an instance, as routes match it: ``calling_ae`` (an AE title, or
    STOW-RS and the client's address) and ``called_ae``, the AE title the modality
    addressed (empty for STOW-RS), so one gateway can offer several AE titles."""

    calling_ae: str = ""
    called_ae: str = ""


@dataclass(frozen=True)
class Preamble:
    kind: str  # "record" | "blank" | "plain"
    length: int = 0
    crc: int = 0
    sender: Sender = Sender()


def _text(value: str, size: int) -> bytes:
    return value.encode("ascii", "replace")[:size]


def _untext(raw: bytes) -> str:
    return raw.rstrip(b"\0 ").decode("ascii", "replace")


def seal(length: int, crc: int, sender: Sender = Sender()) -> bytes:
    """The preamble of a record of ``length`` bytes whose bytes 128.. have CRC-32 ``crc``,
    received from ``sender``."""
    head = _HEAD.pack(RECORD_MAGIC, length, crc, _text(sender.calling_ae, 64), _text(sender.called_ae, 16))
    return head + bytes(PREAMBLE - len(head))


def parse(preamble: bytes) -> Preamble:
    """What the first 128 bytes of a spool file say it is."""
    if preamble[:8] == RECORD_MAGIC and len(preamble) >= _HEAD.size:
        _, length, crc, calling, called = _HEAD.unpack_from(preamble)
        return Preamble("record", length, crc, Sender(_untext(calling), _untext(called)))
    if preamble[:8] == BLANK_MAGIC:
        return Preamble("blank")
    return Preamble("plain")


def outward(head: bytes) -> bytes:
    """A Part 10 file's first bytes as they leave the gateway: a spool record's or
    blank's preamble (its length, checksum, sender's AE title or address) is the
    spool's own, so zeros take its place, as PS3.10 7.1 asks of an unused preamble;
    any other file's preamble is the sender's, left as it is."""
    if head[:8] in (RECORD_MAGIC, BLANK_MAGIC):
        return bytes(min(PREAMBLE, len(head))) + head[PREAMBLE:]
    return head


def read_preamble(fd: int) -> Preamble:
    return parse(os.pread(fd, PREAMBLE, 0))


def verify(fd: int) -> Preamble:
    """Check a record against its checksum; returns its preamble (kind "plain" for a
    file without one, which has nothing to verify). Raises CorruptRecord."""
    head = read_preamble(fd)
    if head.kind == "blank":
        raise CorruptRecord("a blank, not a sealed record")
    if head.kind != "record":
        return head
    if head.length < PREAMBLE + 4:
        raise CorruptRecord(f"record of {head.length} bytes cannot hold a Part 10 file")
    crc, offset = 0, PREAMBLE
    while offset < head.length:
        chunk = os.pread(fd, min(_CHUNK, head.length - offset), offset)
        if not chunk:
            raise CorruptRecord(f"record of {head.length} bytes cut short at {offset}")
        crc = crc32(chunk, crc)
        offset += len(chunk)
    if crc != head.crc:
        raise CorruptRecord("checksum mismatch")
    return head
