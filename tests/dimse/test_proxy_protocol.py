"""`proxy_protocol.parse`: versions 1 and 2 of the PROXY protocol as HAProxy writes
them, headers cut short (more is awaited) and what cannot be a header (refused)."""

from __future__ import annotations

import socket
import struct

import pytest

from gateway.dimse.proxy_protocol import V2_SIGNATURE, ProxyHeaderError, parse

PDU = b"\x01\x00\x00\x00\x00\xcd"  # what follows: the start of an A-ASSOCIATE-RQ


def v2(command: int, family: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


TCP4 = v2(1, 0x11, socket.inet_aton("10.1.2.3") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 40112, 104))
TCP6 = v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "2001:db8::7") + bytes(16) + struct.pack("!HH", 5000, 104))
TLVS = v2(1, 0x11, socket.inet_aton("10.1.2.3") + socket.inet_aton("10.0.0.1") + struct.pack("!HH", 1, 2) + b"\x04\x00\x01x")


@pytest.mark.parametrize(
    ("header", "source"),
    [
        (b"PROXY TCP4 10.1.2.3 10.0.0.1 40112 104\r\n", ("10.1.2.3", 40112)),
        (b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 104\r\n", ("2001:db8::7", 5000)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
        (TCP4, ("10.1.2.3", 40112)),
        (TCP6, ("2001:db8::7", 5000)),
        (TLVS, ("10.1.2.3", 1)),  # type-length-values after the addresses are skipped
        (v2(0, 0x00, b""), None),  # LOCAL: a health check of the proxy's own
        (v2(1, 0x00, b""), None),  # UNSPEC
    ],
)
def test_a_whole_header_gives_its_length_and_client(header: bytes, source: tuple[str, int] | None) -> None:
    assert parse(header + PDU) == (len(header), source)
    for cut in range(1, len(header)):
        assert parse(header[:cut]) is None, cut  # more to come


@pytest.mark.parametrize(
    "data",
    [
        PDU,  # a PDU where the header should be
        b"\x16\x03\x01\x02\x00\x01",  # a TLS ClientHello
        b"PROXY TCP4 10.1.2.3 10.0.0.1 40112\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",  # the wrong family
        b"PROXY TCP4 10.1.2.3 10.0.0.1 99999 104\r\n",
        b"PROXY TCP4 " + b"1" * 120,  # no end within the longest line
        V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12),  # version 3
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),  # command 2
        b"\r\n\r\n\x00\r\nQUIX\n" + bytes(4),
    ],
)
def test_what_cannot_be_a_header_is_refused(data: bytes) -> None:
    with pytest.raises(ProxyHeaderError):
        parse(data)
