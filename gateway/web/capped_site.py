"""The facade's listening site, holding at most ``http.max_connections`` connections.

aiohttp's own sites accept every connection. This one hands asyncio a protocol factory
that first counts the connections open (aiohttp's server knows those past their TLS
handshake, the site those still in it), and past the cap gives the new connection a
protocol that closes it at once (see `gateway.connection_cap`).

With ``[http.tls]`` the site runs each handshake itself (`loop.start_tls`) instead of
letting asyncio run it before any protocol sees the connection: a connection in its
handshake is counted, and the handshake is bounded by ``http.idle_timeout``. Before,
200 connections that never sent a ClientHello were all kept, uncounted, for asyncio's
60 s handshake timeout, past a cap of 4.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web

from gateway.connection_cap import ConnectionCap
from gateway.listening import endpoint, listen_on, opening

log = logging.getLogger("gateway.web")


class _Refused(asyncio.Protocol):
    """A connection past the cap: counted, then closed without a word."""

    def __init__(self, cap: ConnectionCap) -> None:
        self.cap = cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.cap.refused(endpoint(str(peer[0]), peer[1]))
        transport.abort()  # type: ignore[attr-defined]


class _Handshake(asyncio.Protocol):
    """A TLS connection until its handshake ends: then aiohttp's protocol takes it.

    Reading is paused at once, so no byte of the ClientHello reaches this protocol
    before `loop.start_tls` takes the transport over. What the client sends right after
    the handshake (its request, often in the same packet as its Finished) is decrypted
    before `start_tls` returns and lands here: it is kept and handed to aiohttp's
    protocol with the connection."""

    def __init__(self, site: CappedSite, context: ssl.SSLContext) -> None:
        self.site = site
        self.context = context
        self._task: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference
        self._early: list[bytes] = []
        self._eof = False
        self._lost = False
        self._handler: asyncio.BaseProtocol | None = None

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._eof = True
        return None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]
        self.site.handshaking += 1
        self._task = asyncio.get_running_loop().create_task(self._upgrade(transport))  # type: ignore[arg-type]

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(
                transport, self, self.context, server_side=True, ssl_handshake_timeout=self.site.handshake_timeout
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            peer = transport.get_extra_info("peername") or ("?", 0)
            log.debug("HTTPS connection from %s:%s ended in its handshake: %s", peer[0], peer[1], type(exc).__name__)
            transport.abort()
            return
        finally:
            self.site.handshaking -= 1
        if secure is None or self._lost:  # closed during the handshake, or right after it
            return
        handler = self._handler = self.site.handler()
        secure.set_protocol(handler)
        handler.connection_made(secure)
        for data in self._early:
            handler.data_received(data)  # type: ignore[attr-defined]
        if self._eof:
            handler.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection ended after its handshake: aiohttp's protocol hears of it if
        it has the connection already (the call was queued before it took over)."""
        self._lost = True
        if self._handler is not None:
            self._handler.connection_lost(exc)


class CappedSite(web.BaseSite):
    """Like aiohttp's TCPSite on ``host``:``port``, with ``cap`` on open connections;
    ``handshake_timeout``: seconds a TLS handshake may take."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        cap: ConnectionCap,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 60.0,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._cap = cap
        self.handshake_timeout = handshake_timeout
        self.handshaking = 0

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self._host}:{self._port}"

    def handler(self) -> asyncio.BaseProtocol:
        server = self._runner.server
        assert server is not None
        return server()

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        context = self._ssl_context

        def protocol() -> asyncio.BaseProtocol:
            if self._cap.full(len(server.connections) + self.handshaking):
                return _Refused(self._cap)
            return _Handshake(self, context) if context is not None else server()

        with opening("HTTPS port" if context is not None else "HTTP port", self._host, self._port):
            self._server = await asyncio.get_running_loop().create_server(
                protocol, **listen_on(self._host, self._port), backlog=self._backlog
            )
