"""The archive's health as /healthz reports it, probed in the background.

/healthz is the liveness probe (Kubernetes' default timeout is one second): it must
answer quickly even while the archive hangs, or an orchestrator restarts a gateway
that is spooling exactly as it should. So one probe at a time runs as a task of its
own; a request waits for it at most `WAIT_SECONDS`, and otherwise gets the last
result, with its age, or (before any) "no answer yet". The CLI's ``spool status`` asks
/healthz too, and an admin runs it precisely when the archive is in trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gateway.upstream.base import Health, Upstream

log = logging.getLogger("gateway.web")

FRESH_SECONDS = 5.0  # a result this recent is answered without probing again
WAIT_SECONDS = 1.0  # how long a /healthz request waits for a probe under way


class ArchiveHealth:
    """The last probe result of one upstream, and the probe under way if any."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.result: Health | None = None
        self.at = 0.0
        self._task: asyncio.Task[None] | None = None

    async def current(self) -> Health:
        """A result at most FRESH_SECONDS old if the archive answers within
        WAIT_SECONDS; else the last one with its age; else unreachable for now."""
        if self.result is not None and time.monotonic() - self.at <= FRESH_SECONDS:
            return self.result
        if self._task is None:
            self._task = asyncio.create_task(self._probe())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), WAIT_SECONDS)
        if self.result is None:
            return Health(False, f"no answer from the archive within {WAIT_SECONDS:g} s; still waiting")
        age = time.monotonic() - self.at
        if age <= FRESH_SECONDS:
            return self.result
        return Health(self.result.reachable, f"{self.result.detail} ({age:.0f} s ago; the archive has not answered since)")

    async def _probe(self) -> None:
        try:
            health = await self.upstream.health()
        except Exception as exc:  # noqa: BLE001 - a probe that raises says the archive is not usable
            log.warning("archive health probe failed: %s", type(exc).__name__)
            health = Health(False, f"health probe failed: {type(exc).__name__}")
        self.result, self.at = health, time.monotonic()
        self._task = None

    async def close(self) -> None:
        """Cancel a probe still under way (at shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
