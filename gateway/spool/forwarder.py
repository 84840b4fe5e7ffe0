"""Forwarder workers: move queued instances from the spool to the upstream.

Each worker claims a batch (instances of one study, bounded in count and bytes), hands
it to `Upstream.store_instances`, and records one outcome per instance. Workers sleep
until the spool wakes them (a new instance) or the next retry falls due, so a spooled
instance leaves within milliseconds and an idle gateway costs nothing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from gateway.config import SpoolConfig
from gateway.spool.queue import Outcome, Spool, SpooledInstance
from gateway.upstream.base import Upstream

log = logging.getLogger("gateway.forwarder")

PURGE_INTERVAL = 600.0
IDLE_POLL = 5.0


class Forwarder:
    def __init__(self, spool: Spool, upstream: Upstream, cfg: SpoolConfig, linger: float) -> None:
        """``linger``: seconds to wait after an idle spool wakes before claiming, so a
        burst of C-STOREs leaves as a few batched STOW-RS requests instead of one
        request per instance (which costs both us and the archive far more CPU)."""
        self.spool = spool
        self.upstream = upstream
        self.cfg = cfg
        self.linger = linger
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spool")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stop = asyncio.Event()

    def wake(self) -> None:
        """Called on the loop when an instance was queued or requeued."""
        self._wake.set()

    async def start(self) -> None:
        for n in range(self.cfg.concurrency):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"forwarder-{n}"))
        self._tasks.append(asyncio.create_task(self._purger(), name="spool-purger"))

    async def stop(self, grace: float) -> None:
        """Stop claiming; give batches in flight ``grace`` seconds, then cancel them."""
        self._stopping = True
        self._stop.set()
        self._wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _spool(self, fn, *args):  # type: ignore[no-untyped-def]
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _worker(self) -> None:
        max_bytes = self.cfg.batch_max_mb * 1024 * 1024
        idle = False
        while not self._stopping:
            self._wake.clear()
            if idle and self.linger:
                await asyncio.sleep(self.linger)
            try:
                batch = await self._spool(
                    self.spool.claim, self.cfg.batch_max_instances, max_bytes
                )
            except Exception:
                log.exception("cannot claim from the spool; retrying in %s s", IDLE_POLL)
                await asyncio.sleep(IDLE_POLL)
                continue
            idle = not batch
            if not batch:
                due = await self._spool(self.spool.next_due_in)
                timeout = IDLE_POLL if due is None else min(IDLE_POLL, max(due, 0.05))
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._deliver(batch)

    async def _deliver(self, batch: list[SpooledInstance]) -> None:
        study = batch[0].study_uid
        started = time.monotonic()
        try:
            outcomes = await self.upstream.store_instances(study, batch)
        except asyncio.CancelledError:
            await asyncio.shield(self._spool(self.spool.release, batch))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in one upstream must not stop the queue
            log.exception("upstream store failed unexpectedly for study %s", study)
            outcomes = [Outcome(i.id, "retry", f"{type(exc).__name__}: {exc}") for i in batch]
        states = await self._record(batch, outcomes)
        elapsed = time.monotonic() - started
        by_id = {i.id: i for i in batch}
        delivered = [o for o in outcomes if states.get(o.instance_id) == "delivered"]
        if delivered:
            log.info(
                "delivered %d instance(s) of study %s to %s in %.2f s",
                len(delivered),
                study,
                self.upstream.kind,
                elapsed,
            )
        for o in outcomes:
            state = states.get(o.instance_id)
            if state == "delivered":
                continue
            inst = by_id[o.instance_id]
            level = logging.ERROR if state == "dead" else logging.WARNING
            log.log(
                level,
                "instance %s (spool id %d, attempt %d) %s: %s",
                inst.sop_instance_uid,
                inst.id,
                inst.attempts,
                "is dead" if state == "dead" else "will be retried",
                o.error,
            )
        if delivered and self.cfg.retain_delivered_hours == 0:
            await self._spool(self.spool.purge_delivered, 0.0)

    async def _record(self, batch: list[SpooledInstance], outcomes: list[Outcome]) -> dict[int, str]:
        """Store a batch's outcomes, retrying while the spool database cannot be written
        (disk full: SQLITE_FULL): the rows stay 'sending' until this succeeds, and only
        a restart would requeue them if the worker gave up."""
        while True:
            try:
                return await asyncio.shield(self._spool(self.spool.record, batch, outcomes))
            except sqlite3.OperationalError as exc:
                if self._stopping:
                    raise
                log.error("cannot record delivery outcomes (%s); retrying in %s s", exc, IDLE_POLL)
                await asyncio.sleep(IDLE_POLL)

    async def _purger(self) -> None:
        retain = self.cfg.retain_delivered_hours * 3600
        while not self._stopping:
            try:
                removed = await self._spool(self.spool.purge_delivered, retain)
                if removed:
                    log.info("purged %d delivered instance(s) from the spool", removed)
            except Exception:
                log.exception("spool purge failed")
            try:
                await asyncio.wait_for(self._stop.wait(), PURGE_INTERVAL)
            except asyncio.TimeoutError:
                pass
