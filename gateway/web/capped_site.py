"""The facade's listening site, holding at most ``http.max_connections`` connections.

aiohttp's own sites accept every connection. This one hands asyncio a protocol factory
that first asks aiohttp's server how many connections it has open, and past the cap
gives the new connection a protocol that closes it at once (see
`gateway.connection_cap`). With ``[http.tls]`` asyncio runs the TLS handshake before
any protocol sees the connection, so there a refused connection is closed once its
handshake is done; a connection still in its handshake is not counted.
"""

from __future__ import annotations

import asyncio
import ssl

from aiohttp import web

from gateway.connection_cap import ConnectionCap


class _Refused(asyncio.Protocol):
    """A connection past the cap: counted, then closed without a word."""

    def __init__(self, cap: ConnectionCap) -> None:
        self.cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.cap.refused(f"{peer[0]}:{peer[1]}")
        transport.abort()  # type: ignore[attr-defined]


class CappedSite(web.BaseSite):
    """Like aiohttp's TCPSite on ``host``:``port``, with ``cap`` on open connections."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, cap: ConnectionCap, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._cap = cap

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if self._cap.full(len(server.connections)):
                return _Refused(self._cap)
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog, reuse_address=True
        )
