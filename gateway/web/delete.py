"""DELETE of a study, series or instance (Azure's DICOM service, dcm4chee): in the
archive, and in the gateway's own spool.

The gateway answers a C-STORE or a STOW-RS once the instance is durable in its spool,
before the archive has it. A DELETE passed only to the archive would leave what the
spool still holds of the same study (queued behind an outage, or on its way now) to
be delivered after it, and the study deleted would come back in part. So a DELETE
also withdraws the spool's undelivered instances of what it names, waits for those
being sent now, and deletes again in the archive what they delivered meanwhile.

The archive is asked first: one that cannot delete (Orthanc's DICOMweb answers 501)
leaves the spool untouched, so a refused DELETE never half-deletes. The answer is 204
when the archive deleted, or the spool withdrew, anything; 404 when neither held it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.spool.queue import Spool
from gateway.upstream.base import Upstream
from gateway.upstream.errors import NotFound
from gateway.web.auth import requester
from gateway.web.common import error_response, path_uids, text_error
from gateway.web.keys import AUDIT, CACHE, SPOOL, UPSTREAM

log = logging.getLogger("gateway.web")

INDEXED_WAIT = 10.0  # acknowledged instances get their spool rows within milliseconds
SENDING_WAIT = 60.0  # a batch on its way to the archive now
POLL = 0.05
RETRY_AFTER = 10
WHY = "deleted through the facade"

Scope = tuple[str, str | None, str | None]  # study, series, SOP instance UIDs


class Unsettled(Exception):
    """The spool did not reach a state the DELETE can finish from in time."""


async def delete(request: web.Request) -> web.StreamResponse:
    """DELETE a study, series or instance: the archive's copy and the spool's."""
    uids = path_uids(request)
    scope: Scope = (uids["study"], uids.get("series"), uids.get("instance"))
    what = "DELETE"
    try:
        in_archive, withdrawn = await _delete(request.app[SPOOL], request.app[UPSTREAM], scope)
        if not in_archive and not withdrawn:
            raise NotFound("neither the archive nor the spool holds it")
    except Unsettled as exc:
        log.warning("%s %s: answered 503: %s", what, request.path, exc)
        request.app[AUDIT].deleted(requester(request), scope[0], False, f"{what} {request.path}: {exc}")
        return text_error(503, f"{what}: {exc}; try again", {"Retry-After": str(RETRY_AFTER)})
    except Exception as exc:  # noqa: BLE001
        request.app[AUDIT].deleted(requester(request), scope[0], False, f"{what} {request.path}: {type(exc).__name__}")
        return error_response(exc, what)
    finally:
        cache = request.app[CACHE]
        if cache is not None:
            cache.forget_study(scope[0])
    log.info(
        "DELETE %s: done (%s in the archive, %d undelivered instance(s) withdrawn from the spool)",
        "/".join(uids.values()), "deleted" if in_archive else "nothing", withdrawn,
    )
    request.app[AUDIT].deleted(
        requester(request), scope[0], True, f"{what} {request.path}" + (f"; {withdrawn} withdrawn from the spool" if withdrawn else ""),
    )
    return web.Response(status=204)


async def _delete(spool: Spool, upstream: Upstream, scope: Scope) -> tuple[bool, int]:
    """Whether the archive held anything to delete, and how many instances the spool
    withdrew. Raises what the archive raised (but NotFound), or `Unsettled`."""
    await _settle(lambda: spool.indexing(*scope), INDEXED_WAIT, "instances of it just received are not recorded in the spool yet")
    in_archive = await _delete_in_archive(upstream, scope)
    withdrawn, deadline, delivered_meanwhile = 0, time.monotonic() + SENDING_WAIT, False
    while True:
        counts = await asyncio.to_thread(
            spool.discard, scope[0], dry_run=False, series_uid=scope[1], sop_instance_uid=scope[2], why=WHY
        )
        withdrawn += counts["queued"] + counts["failed"] + counts["dead"]
        if not counts["sending"]:
            break
        delivered_meanwhile = True
        await _settle(lambda: spool.sending(*scope), deadline - time.monotonic(), "instances of it are being delivered to the archive now")
    if delivered_meanwhile:
        in_archive = await _delete_in_archive(upstream, scope) or in_archive
    return in_archive, withdrawn


async def _delete_in_archive(upstream: Upstream, scope: Scope) -> bool:
    """Delete in the archive; False if it held nothing there."""
    study, series, instance = scope
    try:
        if instance is not None and series is not None:
            await upstream.delete_instance(study, series, instance)
        elif series is not None:
            await upstream.delete_series(study, series)
        else:
            await upstream.delete_study(study)
    except NotFound:
        return False
    return True


async def _settle(count: Callable[[], int], seconds: float, why: str) -> None:
    """Wait until ``count()`` (run in a thread: it may read the spool database) is 0."""
    deadline = time.monotonic() + seconds
    while await asyncio.to_thread(count):
        if time.monotonic() >= deadline:
            raise Unsettled(why)
        await asyncio.sleep(POLL)


def add_routes(router: Any, prefix: str) -> None:
    """DELETE of the study, series and instance resources under ``prefix``."""
    study = f"{prefix}/studies/{{study}}"
    series = f"{study}/series/{{series}}"
    for path in (study, series, f"{series}/instances/{{instance}}"):
        router.add("DELETE", path, delete)
