"""The aiohttp application: today the health endpoint; the DICOMweb facade joins it."""

from __future__ import annotations

from aiohttp import web

from gateway.spool.queue import Spool
from gateway.upstream.base import Upstream
from gateway.web import health
from gateway.web.keys import HEALTH_CACHE, SPOOL, UPSTREAM


def create_app(spool: Spool, upstream: Upstream) -> web.Application:
    app = web.Application()
    app[SPOOL] = spool
    app[UPSTREAM] = upstream
    app[HEALTH_CACHE] = []
    app.add_routes(health.routes)
    return app
