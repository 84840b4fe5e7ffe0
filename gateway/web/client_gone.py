"""Answers cut short because the client closed its connection, ended quietly.

Viewers cancel requests they no longer need (OHIF drops the frames of a series the
user scrolled past), so a write to a closed connection is routine, not a fault of
the gateway. aiohttp logged each as "Error handling request" with a traceback at
ERROR, and some handlers reported it as an internal error; now it is one INFO line
and, in the metrics, status 499 (nginx's "client closed request"). A handler lets
ConnectionResetError through for this (`gateway.web.common.error_response` raises
it again). One raised while the client's connection is still open is not this, and
goes on as any failure does (the archive's connection failures do not arrive as one:
the HTTP client turns them into UpstreamUnavailable).
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

log = logging.getLogger("gateway.web")

CLIENT_CLOSED = 499


@web.middleware
async def end_quietly(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConnectionResetError:
        if request.transport is not None and not request.transport.is_closing():
            raise  # not this client's connection (it is still open): a failure like any other
        # The path names UIDs only; the query string may hold a patient's name.
        log.info("%s %s: the client closed the connection before the answer was complete", request.method, request.path)
        return web.Response(status=CLIENT_CLOSED)  # never sent: aiohttp meets the closed connection quietly


def install(app: web.Application) -> None:
    """Put the middleware first; `gateway.web.counting` goes in front of it later."""
    app.middlewares.insert(0, end_quietly)
