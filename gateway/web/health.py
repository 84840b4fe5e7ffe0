"""GET /healthz: is the process alive, how full is the spool, can we reach the archive."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from gateway.web.keys import HEALTH_CACHE, SPOOL, UPSTREAM

routes = web.RouteTableDef()

_CACHE_SECONDS = 5.0


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Always 200 while the process runs; ``status`` says ``degraded`` when the archive
    is unreachable or instances are dead, so monitoring can alert on the body."""
    app = request.app
    loop = asyncio.get_running_loop()
    spool_status = await loop.run_in_executor(None, app[SPOOL].status)
    cache = app[HEALTH_CACHE]
    if not cache or time.monotonic() - cache[0] > _CACHE_SECONDS:
        cache[:] = [time.monotonic(), await app[UPSTREAM].health()]
    health = cache[1]
    degraded = not health.reachable or spool_status["counts"]["dead"] > 0
    return web.json_response(
        {
            "status": "degraded" if degraded else "ok",
            "spool": spool_status,
            "upstream": {
                "type": app[UPSTREAM].kind,
                "reachable": health.reachable,
                "detail": health.detail,
            },
        }
    )
