"""Who a request really came from when it came through a reverse proxy.

Behind HAProxy or nginx (TLS ended there, or two nodes behind one name) every request
reaches the facade from the proxy's address, over plain HTTP. Then the lockout of
failed logins would lock every client out at once, the log and the audit trail would
name the proxy for everyone, and the URLs the facade hands back (BulkDataURI,
RetrieveURL) would say ``http://`` to a browser that loaded its page over HTTPS, which
refuses them as mixed content. Proxies say what they saw in ``X-Forwarded-For``,
``X-Forwarded-Proto`` and ``X-Forwarded-Host``; anyone can send those headers, so they
are believed only from the addresses of ``http.trusted_proxies``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.trusted import Network, address_of, is_trusted, networks

_HOST = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def client_address(peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]) -> str | None:
    """The client's address: from the right of the chain ``forwarded_for`` + ``peer``,
    the first hop that is not a trusted proxy (each proxy appends the address it saw,
    so everything left of an untrusted hop is that hop's own say). ``peer`` itself when
    it is not trusted; the last trusted hop when the next one to the left is not an
    address at all, or when every hop is trusted."""
    if not is_trusted(address_of(peer or ""), trusted):
        return peer
    client = peer
    hops = [hop for value in forwarded_for for hop in value.split(",")]
    for hop in reversed(hops):
        address = address_of(hop)
        if address is None:
            return client
        client = str(address)
        if not is_trusted(address, trusted):
            return client
    return client


def _first(value: str | None) -> str:
    """The first of a comma-separated header's values: what the proxy nearest the
    client saw."""
    return (value or "").split(",", 1)[0].strip()


def install(app: web.Application, trusted_proxies: Sequence[str], dual_stack: bool = False) -> None:
    """Outermost middleware: a request from a trusted proxy goes on as its client's,
    with the client's address, scheme and host; any other request as it came, but
    on a ``dual_stack`` port (`gateway.listening`) an IPv4 client's address as IPv4,
    not ``::ffff:a.b.c.d`` (the log, the lockout and the audit trail name it so)."""
    trusted = networks(tuple(trusted_proxies))
    if not trusted and not dual_stack:
        return

    @web.middleware
    async def from_client(request: web.Request, handler: Handler) -> web.StreamResponse:
        remote = request.remote or ""
        if not is_trusted(address_of(remote), trusted):
            if dual_stack and remote.startswith("::ffff:"):
                return await handler(request.clone(remote=str(address_of(remote))))
            return await handler(request)
        changes: dict[str, str] = {}
        client = client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted)
        if client is not None and client != request.remote:
            changes["remote"] = client
        scheme = _first(request.headers.get("X-Forwarded-Proto")).lower()
        if scheme in ("http", "https") and scheme != request.scheme:
            changes["scheme"] = scheme
        host = _first(request.headers.get("X-Forwarded-Host"))
        if host and _HOST.fullmatch(host) and host != request.host:
            changes["host"] = host
        return await handler(request.clone(**changes) if changes else request)  # type: ignore[arg-type]

    app.middlewares.insert(0, from_client)
