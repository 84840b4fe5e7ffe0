"""Every HTTP request counted in /metrics by route pattern, method and status.

The outermost middleware, so refusals by the auth middleware (401) and errors raised
as HTTP exceptions are counted like answers; the time runs until the handler is done,
which for a streamed WADO-RS answer is when its last byte was written.
"""

from __future__ import annotations

import time

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.web.metrics import METRICS



def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        request.app[METRICS].http_request(_route(request), request.method, status, time.monotonic() - started)


def install(app: web.Application) -> None:
    """Put the counter outside every other middleware."""
    app.middlewares.insert(0, count_requests)
