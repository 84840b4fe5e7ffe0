"""GET /healthz: is the process alive, how full is the spool, can we reach the archive."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

from aiohttp import web

from gateway.web.keys import ARCHIVE_HEALTH, AUDIT, PROBLEMS, SPOOL, UPSTREAM

routes = web.RouteTableDef()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Always 200 while the process runs; ``status`` says ``degraded`` when the archive
    is unreachable, instances or routes' copies are dead, or something keeps delivery from working
    (``problems``: the spool database refusing writes, the archive refusing our
    credentials or URL, the audit trail unable to reach its repository or file), so
    monitoring can alert on the body. Never waits on a hung archive for more than a
    second (`ArchiveHealth`): this is the liveness probe."""
    app = request.app
    loop = asyncio.get_running_loop()
    problems: list[dict[str, Any]] = [
        {"component": p.component, "reason": p.reason, "since": _iso(p.since)} for p in app[PROBLEMS].all()
    ]
    trail = app[AUDIT].trail
    since = trail.failing_since if trail is not None else None
    if trail is not None and since is not None:
        problems.append({"component": "audit trail", "reason": trail.last_error, "since": _iso(since)})
    spool_status: dict[str, Any] | None
    try:
        spool_status = await loop.run_in_executor(None, app[SPOOL].status)
    except (sqlite3.Error, OSError) as exc:
        spool_status = None
        problems.append(
            {"component": "spool", "reason": f"cannot read the spool: {type(exc).__name__}: {exc}", "since": _iso(time.time())}
        )
    health = await app[ARCHIVE_HEALTH].current()
    dead = spool_status is not None and (
        spool_status["counts"]["dead"] > 0 or any(r["counts"]["dead"] for r in spool_status["routes"].values())
    )
    degraded = not health.reachable or bool(problems) or dead
    return web.json_response(
        {
            "status": "degraded" if degraded else "ok",
            "problems": problems,
            "spool": spool_status,
            "upstream": {
                "type": app[UPSTREAM].kind,
                "reachable": health.reachable,
                "detail": health.detail,
            },
        }
    )
