"""Addresses of the proxies whose word about a connection's client is taken
(``http.trusted_proxies``, ``dimse.trusted_proxies``): an entry is an address (a
network of one) or a network. Imports nothing of ours, so both fronts share it."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=8)
def networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """The entries as networks. Raises ValueError naming one that is neither an
    address nor a network (the config check says so first)."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def address_of(text: str) -> Address | None:
    """An address as sockets and headers give it (``[v6]:port``, ``v4:port`` or bare);
    an IPv4 address on a dual-stack socket (``::ffff:10.0.0.1``) as IPv4; None when
    it is none."""
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(address: Address | None, trusted: Sequence[Network]) -> bool:
    return address is not None and any(address in network for network in trusted)
