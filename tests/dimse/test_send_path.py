"""The C-STORE sending path: a data set from memory or from a file goes out as the
same PDUs, fragmented to the peer's maximum, and arrives whole and in order through a
socket that takes only part of it at a time."""

from __future__ import annotations

import asyncio
import socket
import struct
from pathlib import Path

import pytest

from gateway.dimse import pdu
from gateway.dimse.association import write_gathered
from gateway.dimse.requestor import FrameBuffer, send_dataset
from gateway.retrieval.source import FileSlice


def _messages(stream: bytes) -> list[tuple[int, int, bytes]]:
    """(context id, control, fragment) of every PDV in a run of P-DATA-TF PDUs,
    checking each PDU's length."""
    out: list[tuple[int, int, bytes]] = []
    pos = 0
    while pos < len(stream):
        kind, _, length = struct.unpack_from(">BBI", stream, pos)
        assert kind == pdu.P_DATA_TF
        out += [(c, ctl, bytes(f)) for c, ctl, f in pdu.parse_pdata(stream[pos + 6 : pos + 6 + length])]
        pos += 6 + length
    assert pos == len(stream)
    return out


def _collect(source: bytes | FileSlice, peer_max_pdu: int, frames: FrameBuffer | None) -> bytes:
    written: list[bytes] = []

    async def write(pieces: list[bytes | bytearray | memoryview]) -> None:
        written.append(b"".join(bytes(p) for p in pieces))

    asyncio.run(send_dataset(write, 5, source, peer_max_pdu, b"\x00" * 10, frames))
    return b"".join(written)


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 5000])
def test_file_and_memory_data_sets_make_the_same_pdus(tmp_path: Path, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    path = tmp_path / "f.dcm"
    path.write_bytes(b"PREAMBLE" + data + b"TRAILER")
    frames = FrameBuffer()
    from_memory = _collect(data, 106, None)
    for _ in range(2):  # the second time in the reused buffer
        assert _collect(FileSlice(path, 8, size), 106, frames) == from_memory
    pdvs = _messages(from_memory)
    assert all(len(p) <= 100 for _, _, p in pdvs)
    assert pdvs[0] == (5, 3, b"\x00" * 10)  # the command, last fragment
    assert b"".join(p for _, _, p in pdvs[1:]) == data
    assert [ctl for _, ctl, _ in pdvs[1:]] == [0] * (len(pdvs) - 2) + [2]


def test_file_shorter_than_recorded_raises(tmp_path: Path) -> None:
    path = tmp_path / "f.dcm"
    path.write_bytes(b"x" * 50)
    with pytest.raises(OSError):
        _collect(FileSlice(path, 0, 80), 106, None)


def test_gathered_write_arrives_whole_through_a_socket_that_takes_part_at_a_time() -> None:
    """More than the socket buffers, from many pieces: what writev leaves goes through
    the transport, after what it sent, and nothing is lost or reordered."""
    pieces = [bytes([i % 251]) * (1000 + i * 37) for i in range(300)]
    expected = b"".join(pieces)

    async def run() -> bytes:
        left, right = socket.socketpair()
        left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader, writer = await asyncio.open_connection(sock=left)
        peer_reader, peer_writer = await asyncio.open_connection(sock=right)
        write_gathered(writer, [memoryview(p) for p in pieces[:150]])
        write_gathered(writer, pieces[150:])  # queued behind the first: all through the transport
        received = await peer_reader.readexactly(len(expected))
        await writer.drain()
        writer.close()
        peer_writer.close()
        return received

    assert asyncio.run(run()) == expected
