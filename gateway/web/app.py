"""The aiohttp application: /healthz, /readyz, /metrics and the DICOMweb facade.

The facade's resources are mounted under ``http.base_path`` and again under the roots
other services use (Azure's ``/v1``, ``/v1.0-prerelease``, ``/v2``; HealthImaging's
``/datastore/{datastoreId}``), so clients written for those work with only the host
changed. Each resource also answers with a trailing slash (the SIIM guide writes
``/studies/?00100010=...``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from gateway.audit.auditor import Auditor
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.retrieval.engine import Retriever
from gateway.spill import SpillArea
from gateway.spool.forwarder import Problems
from gateway.spool.queue import Spool
from gateway.upstream.base import Upstream
from gateway.web import auth, client_gone, counting, delete, expect, forwarded, health, qido, ready, rendered, retrieve_capabilities, stow, wado
from gateway.web import metrics as metrics_routes
from gateway.listening import EVERY_ADDRESS
from gateway.web.cache import FacadeCache
from gateway.web.archive_health import ArchiveHealth
from gateway.web.keys import (
    ARCHIVE_HEALTH,
    AUDIT,
    CACHE,
    CONFIG,
    PROBLEMS,
    REFUSED_SERIES,
    RETRIEVER,
    SPOOL,
    UPSTREAM,
    WHOLE_INSTANCE_FRAMES,
)
from gateway.web.refusals import RefusedSeries
from gateway.web.whole_instance import WholeInstanceFrames

log = logging.getLogger("gateway.web")
ALIAS_ROOTS = ("/v1", "/v1.0-prerelease", "/v2", "/datastore/{datastoreId}")
# Bodies read whole (none of the facade's: STOW-RS streams its body part by part).
MAX_SIMPLE_BODY = 1 << 20


class _Router:
    """Adds each route with and without a trailing slash; each GET route answers HEAD
    too (same handler: aiohttp sends its status and headers without the body). A route
    that may take a body invites it only when its handler reads it (`expect`)."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self.router = router

    def add(self, method: str, path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        for variant in (path, path + "/"):
            if method == "GET":
                self.router.add_get(variant, handler, allow_head=True)
            else:
                self.router.add_route(method, variant, handler, expect_handler=expect.defer_continue)


def roots(config: Config) -> list[str]:
    """Every DICOMweb root the facade answers under ("" for a base path of "/")."""
    base = "" if config.http.base_path == "/" else config.http.base_path
    return list(dict.fromkeys([base, *ALIAS_ROOTS]))


def facade_cache(config: Config, metrics: Metrics | None = None, floor: SpillArea | None = None) -> FacadeCache | None:
    """The on-disk cache of a remote upstream's frames and metadata (``[http.cache]``).
    On the spool's disk (the default), it keeps that disk's floor as ``floor`` (the
    retrievals' spill area) does."""
    cache = config.http.cache
    if config.upstream.type == "local" or cache.max_mb <= 0:
        return None
    directory = Path(cache.directory) if cache.directory else config.spool.directory / "facade-cache"
    try:
        made = FacadeCache(directory, int(cache.max_mb * (1 << 20)), cache.metadata_seconds, metrics)
        if floor is not None and directory.stat().st_dev == floor.directory.stat().st_dev:
            made.floor = floor
        return made
    except OSError as exc:
        log.warning("facade cache disabled: cannot use %s: %s", directory, exc.strerror or type(exc).__name__)
        return None


async def _close_archive_health(app: web.Application) -> None:
    await app[ARCHIVE_HEALTH].close()


async def _hardened(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer says its Content-Type is to be believed (``nosniff``: an error text
    quotes the query key it refuses, and no browser may take it for a page), and names
    no software versions (aiohttp's default ``Server`` header gives Python's and its
    own, which a security scan reports)."""
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Server"] = "dicom-gateway"


def create_app(
    config: Config,
    spool: Spool,
    upstream: Upstream,
    retriever: Retriever,
    problems: Problems | None = None,
    metrics: Metrics | None = None,
    audit: Auditor | None = None,
) -> web.Application:
    app = web.Application(client_max_size=MAX_SIMPLE_BODY)
    app[CONFIG] = config
    app[AUDIT] = audit if audit is not None else Auditor(config, None)
    app[SPOOL] = spool
    app[UPSTREAM] = upstream
    app[RETRIEVER] = retriever
    app[PROBLEMS] = problems if problems is not None else Problems()
    app[ARCHIVE_HEALTH] = ArchiveHealth(upstream)
    app.on_cleanup.append(_close_archive_health)
    app.on_response_prepare.append(_hardened)
    metrics = metrics if metrics is not None else Metrics()
    cache = app[CACHE] = facade_cache(config, metrics, retriever.spill_area)
    app[REFUSED_SERIES] = RefusedSeries()
    app[WHOLE_INSTANCE_FRAMES] = None if cache is None else WholeInstanceFrames(cache)
    auth.install(app, config.http.auth, config.http.cors_origins, config.http.read_only, metrics)
    client_gone.install(app)  # inside the counter (installed below), so it counts 499
    app.add_routes(health.routes)
    app[metrics_routes.METRICS] = metrics
    counting.install(app)
    # outermost: all the rest sees the client
    forwarded.install(app, config.http.trusted_proxies, dual_stack=config.http.host == EVERY_ADDRESS)
    app.add_routes(metrics_routes.routes)
    app.add_routes(ready.routes)
    router = _Router(app.router)
    for root in roots(config):
        qido.add_routes(router, root)
        wado.add_routes(router, root)
        delete.add_routes(router, root)
        stow.add_routes(router, root)
        rendered.add_routes(router, root)
        retrieve_capabilities.add_routes(router, root)
    rendered.add_wado_uri(router)
    return app
