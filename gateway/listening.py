"""Where the DIMSE ports and the HTTP port listen, and how a connection's end is written.

asyncio turns ``IPV6_V6ONLY`` on for every IPv6 socket it binds, so a port on
``host = "::"`` refused every IPv4 client: most modalities and PACS, while the
gateway's log said it listened "on :::11112". An admin writing ``::`` means every
address of both families, as Linux's default (``bindv6only = 0``) and most servers
take it, so that host is bound here as one dual-stack socket. Connections from IPv4
then come from ``::ffff:a.b.c.d``; `endpoint` writes them as ``a.b.c.d:port`` (and an
IPv6 end as ``[h]:port``), so logs, host checks and the audit trail name the address
the admin configured.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from gateway.trusted import address_of

EVERY_ADDRESS = "::"


def listen_on(host: str, port: int) -> dict[str, Any]:
    """The arguments of `asyncio.start_server` / `loop.create_server` for ``host``:``port``."""
    if host != EVERY_ADDRESS:
        return {"host": host, "port": port, "reuse_address": True}
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((EVERY_ADDRESS, port))
    except OSError:
        sock.close()
        raise
    return {"sock": sock}


@contextlib.contextmanager
def opening(what: str, host: str, port: int) -> Iterator[None]:
    """Open a listener, a failure said with which one: asyncio names only the address
    ("error while attempting to bind on address ('0.0.0.0', 104): permission denied"),
    where an admin needs "DIMSE port 0.0.0.0:104: Permission denied" (a port below
    1024 without CAP_NET_BIND_SERVICE), "... Address already in use" (another PACS
    on it) or "... Cannot assign requested address" (a host not of this machine)."""
    try:
        yield
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(f"{what} {endpoint(host, port)}: {reason}") from None


def endpoint(host: str, port: int) -> str:
    """``host:port`` as a log and an admin read it: an IPv4 client of a dual-stack port
    as IPv4, an IPv6 address in brackets."""
    address = address_of(host)
    if address is None:
        return f"{host}:{port}"
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
