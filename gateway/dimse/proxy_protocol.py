"""The PROXY protocol header a load balancer puts before a connection's first byte.

HAProxy in TCP mode (the README's two-node set-up) hands each association to a node
over its own connection, so without this every association comes from HAProxy's
address: the peers' ``host`` checks cannot be done by the gateway, and the log and
the audit trail name the proxy for every modality. With ``send-proxy`` (version 1, a
text line) or ``send-proxy-v2`` (binary) HAProxy first says whom it is passing on; the
gateway believes that only from ``dimse.trusted_proxies``, and from those it requires
it. Version 2's LOCAL command (HAProxy's own health checks) names nobody: the
connection is then the proxy's own.

The header is read from a duplicate of the socket while the transport is paused,
exactly its length, so what follows (a PDU, or a TLS handshake) stays in the socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import struct
from typing import cast

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest version 1 line, CRLF included
V2_FIXED = 16

Source = tuple[str, int] | None  # the client's address and port; None: the proxy's own


class ProxyHeaderError(ValueError):
    """What a trusted proxy sent is not a PROXY protocol header."""


def parse(data: bytes) -> tuple[int, Source] | None:
    """``(length of the header, source)`` once ``data`` holds a whole header; None while
    it may still be one. Raises ProxyHeaderError when it cannot be one."""
    if data[: min(len(data), 12)] == V2_SIGNATURE[: min(len(data), 12)] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[: min(len(data), 6)] == b"PROXY "[: min(len(data), 6)]:
        return _parse_v1(data)
    raise ProxyHeaderError("the connection does not begin with a PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[int, Source] | None:
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY protocol line too long")
        return None
    fields = data[:end].decode("ascii", "replace").split(" ")
    if fields[1:2] == ["UNKNOWN"]:
        return end + 2, None
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY protocol line")
    try:
        address = ipaddress.ip_address(fields[2])
        port = int(fields[4])
    except ValueError:
        raise ProxyHeaderError("malformed PROXY protocol line") from None
    if address.version != (4 if fields[1] == "TCP4" else 6) or not 0 <= port <= 65535:
        raise ProxyHeaderError("malformed PROXY protocol line")
    return end + 2, (str(address), port)


def _parse_v2(data: bytes) -> tuple[int, Source] | None:
    if len(data) < V2_FIXED:
        return None
    if data[:12] != V2_SIGNATURE:
        raise ProxyHeaderError("the connection does not begin with a PROXY protocol header")
    version_command, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyHeaderError(f"unsupported PROXY protocol version/command 0x{version_command:02x}")
    total = V2_FIXED + length
    if len(data) < total:
        return None
    if version_command & 0x0F == 0:  # LOCAL: the proxy's own connection (a health check)
        return total, None
    body = data[V2_FIXED:total]
    if family >> 4 == 1 and len(body) >= 12:  # AF_INET
        return total, (socket.inet_ntop(socket.AF_INET, body[:4]), struct.unpack_from("!H", body, 8)[0])
    if family >> 4 == 2 and len(body) >= 36:  # AF_INET6
        return total, (socket.inet_ntop(socket.AF_INET6, body[:16]), struct.unpack_from("!H", body, 32)[0])
    return total, None  # AF_UNSPEC or AF_UNIX: nobody to name


async def read_header(writer: asyncio.StreamWriter, timeout: float) -> Source:
    """Read the PROXY protocol header at the start of the connection (see the module's
    docstring). Raises ProxyHeaderError for anything else, TimeoutError when it is not
    complete within ``timeout``, and asyncio.IncompleteReadError when the connection
    closes first (with nothing read: a port check)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        raise ProxyHeaderError("no socket to read a PROXY protocol header from")
    transport = cast(asyncio.Transport, writer.transport)
    transport.pause_reading()
    with socket.socket(fileno=os.dup(sock.fileno())) as peek:
        peek.setblocking(False)
        async with asyncio.timeout(timeout):
            want = V2_FIXED
            while True:
                await wait_readable(peek)
                try:
                    data = peek.recv(want, socket.MSG_PEEK)
                except BlockingIOError:
                    continue
                if not data:
                    raise asyncio.IncompleteReadError(b"", None)
                found = parse(data)
                if found is not None:
                    length, source = found
                    peek.recv(length)  # exactly the header: what follows stays
                    transport.resume_reading()
                    return source
                if len(data) == want:  # more is needed than was asked
                    want = V1_MAX if data.startswith(b"PROXY") else V2_FIXED + struct.unpack_from("!H", data, 14)[0]
                else:
                    await asyncio.sleep(0.005)  # part of it so far: wait for the rest


async def wait_readable(sock: socket.socket) -> None:
    """Until ``sock`` (a duplicate the loop lets us watch) has bytes to read, or has
    been closed by its peer."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
