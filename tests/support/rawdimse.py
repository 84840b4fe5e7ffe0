"""Associations made byte by byte: what a misbehaving peer sends, which no real
client can be told to."""

from __future__ import annotations

import socket
import struct


def associate_rq(called: str, calling: str, max_pdu: int = 16384) -> bytes:
    """A raw A-ASSOCIATE-RQ proposing Verification, announcing ``max_pdu``."""
    def item(kind: int, value: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(value)) + value
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1") + item(0x40, b"1.2.840.10008.1.2"))
    user = item(0x50, item(0x51, struct.pack(">I", max_pdu)) + item(0x52, b"1.2.3.4"))
    body = (
        struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
        + item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user
    )
    return struct.pack(">BBI", 1, 0, len(body)) + body


def hold(port: int, called: str, calling: str) -> socket.socket:
    """An established association that then says nothing."""
    holder = socket.create_connection(("127.0.0.1", port), timeout=30)
    holder.sendall(associate_rq(called, calling))
    kind, length = read_pdu_header(holder)
    assert kind == 0x02  # A-ASSOCIATE-AC
    read_exactly(holder, length)
    return holder


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def read_pdu_header(sock: socket.socket) -> tuple[int, int]:
    kind, _, length = struct.unpack(">BBI", read_exactly(sock, 6))
    return kind, length
