"""A ConnectionResetError is the client going away only when its connection is."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from gateway.web import client_gone


async def _status_of(handler) -> int:  # type: ignore[no-untyped-def]
    app = web.Application()
    client_gone.install(app)
    app.router.add_get("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/") as resp:
            return resp.status
    finally:
        await runner.cleanup()


def test_a_reset_raised_while_the_client_is_connected_is_a_failure_not_a_departure() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        raise ConnectionResetError("some other connection")  # e.g. a library's own socket

    assert asyncio.run(_status_of(handler)) == 500  # not the 499 of a client that left
