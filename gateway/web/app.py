"""The aiohttp application: today the health endpoint; the DICOMweb facade joins it."""

from __future__ import annotations

from aiohttp import web

from gateway.spool.forwarder import Problems
from gateway.spool.queue import Spool
from gateway.upstream.base import Upstream
from gateway.web import health
# ops: /metrics and /readyz
from gateway.metrics import Metrics
from gateway.web import metrics as metrics_routes
from gateway.web import ready
from gateway.web.keys import HEALTH_CACHE, PROBLEMS, SPOOL, UPSTREAM


def create_app(
    spool: Spool, upstream: Upstream, problems: Problems | None = None, metrics: Metrics | None = None
) -> web.Application:
    app = web.Application()
    app[SPOOL] = spool
    app[UPSTREAM] = upstream
    app[PROBLEMS] = problems if problems is not None else Problems()
    app[HEALTH_CACHE] = []
    app.add_routes(health.routes)
    # ops: /metrics and /readyz
    app[metrics_routes.METRICS] = metrics if metrics is not None else Metrics()
    app.add_routes(metrics_routes.routes)
    app.add_routes(ready.routes)
    return app
