"""GET /metrics: the daemon's Prometheus registry in the text exposition format.

Counters and histograms are kept up to date by the services as they work; the spool's
gauges (instances and bytes per state, age of the oldest pending instance, free space)
and disk limits are read from the spool when scraped. The whole exposition is rendered on a
worker thread, so a slow spool read never stalls the event loop serving DIMSE.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.audit.auditor import Auditor
from gateway.metrics import Metrics
from gateway.spool.copies import COPY_STATES
from gateway.spool.queue import STATES, Spool

log = logging.getLogger("gateway.web")

METRICS = web.AppKey("metrics", Metrics)

routes = web.RouteTableDef()


class AuditCollector(Collector):
    """What became of the audit trail's messages, read at scrape time from the
    Auditor (its counts go on across a reload that replaces the trail); nothing while
    there is no audit trail and never was one."""

    def __init__(self, auditor: Auditor) -> None:
        self.auditor = auditor

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self.auditor.counts()
        if self.auditor.trail is None and not any(counts.values()):
            return
        family = CounterMetricFamily(
            "gateway_audit_messages", "Audit messages: sent (or written), dropped (queue full), failed (send attempts that failed)",
            labels=["result"],
        )
        for result, value in counts.items():
            family.add_metric([result], value)
        yield family


class SpoolCollector(Collector):
    """The spool's state and disk limits, read at scrape time (on the scraping worker thread)."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            status = self.spool.status()
        except (sqlite3.Error, OSError) as exc:
            # The scrape still answers with everything else; /healthz names the problem.
            log.warning("metrics: cannot read the spool: %s: %s", type(exc).__name__, exc)
            return
        depth = GaugeMetricFamily("gateway_spool_instances", "Spooled instances by state", labels=["state"])
        size = GaugeMetricFamily("gateway_spool_bytes", "Bytes of spooled instances by state", labels=["state"])
        for state in STATES:
            depth.add_metric([state], status["counts"][state])
            size.add_metric([state], status["bytes"][state])
        yield depth
        yield size
        age = status["oldest_pending_age_seconds"]
        yield GaugeMetricFamily(
            "gateway_spool_oldest_pending_age_seconds",
            "Age of the oldest instance not yet delivered (0: none waiting)",
            value=age or 0.0,
        )
        copies = GaugeMetricFamily(
            "gateway_route_copies_spooled",
            "Copies routes send on, by destination and state (as gateway_spool_instances)",
            labels=["destination", "state"],
        )
        waiting = GaugeMetricFamily(
            "gateway_route_oldest_pending_age_seconds",
            "Age of the oldest instance a route's destination has not received yet (0: none waiting)",
            labels=["destination"],
        )
        # Every configured destination, also when the spool holds no copy for it.
        for destination in sorted(set(status["routes"]) | {r.destination for r in self.spool.routes}):
            route = status["routes"].get(destination, {"counts": dict.fromkeys(COPY_STATES, 0)})
            for state, count in route["counts"].items():
                copies.add_metric([destination, state], count)
            waiting.add_metric([destination], route.get("oldest_pending_age_seconds") or 0.0)
        yield copies
        yield waiting
        yield GaugeMetricFamily("gateway_spool_free_bytes", "Free space on the spool's file system", value=status["free_bytes"])
        yield GaugeMetricFamily(
            "gateway_spool_used_bytes", "Bytes of the spool's files, those being received included",
            value=self.spool.used_bytes(),
        )
        yield GaugeMetricFamily("gateway_spool_max_bytes", "spool.max_size_mb in bytes (0: no cap)", value=self.spool.cap)
        near = GaugeMetricFamily(
            "gateway_spool_limit_near",
            "1 when a disk limit is close: free space under 110 % of the floor, or the spool at 90 % of its cap",
            labels=["limit"],
        )
        for limit, is_near in self.spool.limits_near().items():
            near.add_metric([limit], 1 if is_near else 0)
        yield near


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
