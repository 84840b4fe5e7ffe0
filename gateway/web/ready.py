"""GET /readyz: should a load balancer or orchestrator send work here now?

Ready means all of: the spool can make a file durable (a tiny write, fsync and unlink
in the spool directory, on a worker thread), neither disk limit is near (free space
under 110 % of ``spool.min_free_mb``, the spool at 90 % of ``spool.max_size_mb``), and
the upstream answered its health probe, each within `READY_TIMEOUT` seconds. 200 when ready, else 503; either way the JSON body
says which check failed and why. ``/healthz`` stays the liveness probe: a gateway that
is not ready still spools what it can and must not be restarted for it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.spool.queue import Spool
from gateway.web.keys import SPOOL, UPSTREAM

READY_TIMEOUT = 5.0

routes = web.RouteTableDef()


def probe_write(directory: Path) -> None:
    """Create, fsync and remove a small file in ``directory``; raises OSError if it cannot."""
    path = directory / f".readyz-{uuid.uuid4().hex}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"ready\n")
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


async def _spool_check(directory: Path) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, probe_write, directory), READY_TIMEOUT)
    except TimeoutError:
        return {"ok": False, "detail": f"a write to the spool took more than {READY_TIMEOUT:g} s"}
    except OSError as exc:
        return {"ok": False, "detail": f"spool not writable: {exc.strerror or exc}"}
    return {"ok": True, "detail": "writable"}


NEAR_WORDS = {
    "floor": "free space within 10 % of spool.min_free_mb",
    "cap": "spool within 10 % of spool.max_size_mb",
}


async def _disk_check(spool: Spool) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    try:
        near = await asyncio.wait_for(loop.run_in_executor(None, spool.limits_near), READY_TIMEOUT)
    except TimeoutError:
        return {"ok": False, "detail": f"the spool's disk usage took more than {READY_TIMEOUT:g} s to read"}
    except OSError as exc:
        return {"ok": False, "detail": f"cannot read the spool's disk usage: {exc.strerror or exc}"}
    reached = [NEAR_WORDS[limit] for limit, is_near in near.items() if is_near]
    return {"ok": not reached, "detail": "; ".join(reached) or "below both limits"}


async def _upstream_check(app: web.Application) -> dict[str, Any]:
    try:
        health = await asyncio.wait_for(app[UPSTREAM].health(), READY_TIMEOUT)
    except TimeoutError:
        return {"ok": False, "detail": f"no answer within {READY_TIMEOUT:g} s"}
    return {"ok": health.reachable, "detail": health.detail}


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    app = request.app
    spool, disk, upstream = await asyncio.gather(
        _spool_check(app[SPOOL].directory), _disk_check(app[SPOOL]), _upstream_check(app)
    )
    checks = {"spool": spool, "disk": disk, "upstream": upstream}
    ready = all(c["ok"] for c in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503
    )
