"""Forwarder workers: move queued instances from the spool to the upstream.

Each worker claims a batch (instances of one study, bounded in count and bytes), hands
it to `Upstream.store_instances`, and records one outcome per instance. Workers sleep
until the spool wakes them (a new instance) or the next retry falls due, so a spooled
instance leaves within milliseconds and an idle gateway costs nothing.

A worker never dies of an error: a spool database that refuses (locked, full,
read-only) is retried, and an outcome the archive already gave is kept in memory and
recorded as soon as the database takes it, so no claimed row stays ``sending``.
While such a failure lasts it is listed in `Problems`, which /healthz reports.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.audit.auditor import Auditor, tally_of
from gateway.config import SpoolConfig
from gateway.log_throttle import Throttle, left_out
from gateway.metrics import Metrics
from gateway.spool.queue import Outcome, Spool, SpooledInstance
from gateway.upstream.base import Upstream

log = logging.getLogger("gateway.forwarder")

PURGE_INTERVAL = 600.0
IDLE_POLL = 5.0
# First pause after a failed spool write; doubles up to IDLE_POLL.
RETRY_PAUSE = 0.5

T = TypeVar("T")


@dataclass(frozen=True)
class Problem:
    """Something that keeps delivery from working right now."""

    component: str
    reason: str
    since: float  # time.time() when it started


class Problems:
    """The delivery problems going on now, by component (``spool``, ``archive``...).

    Set when a failure starts and cleared by the next success, so /healthz says
    ``degraded``, and why, for exactly as long as it lasts. Used on the loop only.
    """

    def __init__(self) -> None:
        self._items: dict[str, Problem] = {}

    def set(self, component: str, reason: str) -> None:
        """Record a problem, or a new reason for one going on (which keeps its start)."""
        old = self._items.get(component)
        self._items[component] = Problem(component, reason, old.since if old else time.time())

    def clear(self, component: str) -> Problem | None:
        """End a problem; returns it if there was one."""
        return self._items.pop(component, None)

    def all(self) -> list[Problem]:
        return sorted(self._items.values(), key=lambda p: p.since)


@dataclass
class Hold:
    """Delivery held because the archive refuses the gateway's configuration.

    Sending more would only be refused the same way, so one worker at a time probes
    with the oldest due batch, at ``next_probe``; the others wait. The pause between
    probes doubles up to ``spool.retry_max_seconds``.
    """

    reason: str
    started: float  # time.monotonic()
    pause: float
    next_probe: float = 0.0
    probing: bool = False


def id_ranges(ids: list[int]) -> str:
    """Spool ids as runs (``3-40, 45``): a batch is mostly consecutive rows."""
    runs: list[list[int]] = []
    for n in sorted(ids):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


class Forwarder:
    def __init__(
        self, spool: Spool, upstream: Upstream, cfg: SpoolConfig, linger: float, metrics: Metrics | None = None,
        audit: Auditor | None = None,
    ) -> None:
        """``linger``: seconds to wait after an idle spool wakes before claiming, so a
        burst of C-STOREs leaves as a few batched STOW-RS requests instead of one
        request per instance (which costs both us and the archive far more CPU).
        ``metrics``: where delivery attempts and their outcomes are counted. ``audit``:
        the audit trail, told of each batch delivered."""
        self.metrics = metrics if metrics is not None else Metrics()
        self.audit = audit
        self.spool = spool
        self.upstream = upstream
        self.cfg = cfg
        self.linger = linger
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="spool")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stop = asyncio.Event()
        # every worker meets a failing database alike, again and again
        self._db_errors = Throttle(burst=1)
        self._record_errors = Throttle(burst=1)
        self._retry_lines = Throttle()  # an outage fails every queued instance at each retry
        self._only_locked = False  # the last spool write failed only on a lock held elsewhere
        self.problems = Problems()
        self._hold: Hold | None = None
        # Told (study UID, [(series UID, SOP Instance UID)]) of each delivered batch, so
        # what a front keeps of the archive's answers (the facade cache) can be dropped.
        self.on_delivered: Callable[[str, list[tuple[str, str]]], None] | None = None

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

    async def _spool(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _write(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """A spool write; a failure is listed as the ``spool`` problem until a write succeeds.

        Only writes end the problem: reads still work while another connection holds
        the write lock (or the file system has turned read-only), so their success
        proves nothing.
        """
        try:
            result = await self._spool(fn, *args)
        except Exception as exc:
            self.problems.set("spool", f"cannot {what}: {type(exc).__name__}: {exc}")
            self._only_locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
            raise
        if not result and not self._only_locked:
            # Nothing to claim: the transaction took the lock and wrote nothing, which
            # ends a lock held elsewhere but proves nothing of a failing disk.
            return result
        ended = self.problems.clear("spool")
        if ended is not None:
            log.info("spool database writable again after %.1f s", time.time() - ended.since)
        return result

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the forwarder stops."""
        try:
            await asyncio.wait_for(self._stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    async def _worker(self) -> None:
        """Claim, deliver, record, forever; survives any error (logged, then paused)."""
        idle = False
        pause = RETRY_PAUSE
        while not self._stopping:
            try:
                idle = await self._step(idle)
                pause = RETRY_PAUSE
            except asyncio.CancelledError:
                raise
            except sqlite3.Error as exc:
                said, held = self._db_errors.admit()
                if said:
                    log.error(
                        "spool database error (%s: %s); forwarder retries in %.1f s%s",
                        type(exc).__name__, exc, pause, left_out(held),
                    )
                await self._pause(pause)
                pause = min(pause * 2, IDLE_POLL)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop delivery for good
                log.exception("forwarder error; retrying in %.1f s", pause)
                self.problems.set("forwarder", f"unexpected error: {type(exc).__name__}")
                await self._pause(pause)
                pause = min(pause * 2, IDLE_POLL)
            else:
                self.problems.clear("forwarder")

    async def _step(self, idle: bool) -> bool:
        """One claim and, if it found work, one delivery; returns whether the spool was idle."""
        max_bytes = self.cfg.batch_max_mb * 1024 * 1024
        self._wake.clear()
        hold = self._hold
        if hold is not None:
            if hold.probing or time.monotonic() < hold.next_probe:
                self.spool.answer_waiters("config", hold.reason)
                wait = IDLE_POLL if hold.probing else hold.next_probe - time.monotonic()
                await self._wait_wake(max(0.05, min(IDLE_POLL, wait)))
                return False
            hold.probing = True
        elif idle and self.linger:
            await asyncio.sleep(self.linger)
        try:
            batch = await self._write(
                "claim instances from the spool", self.spool.claim, self.cfg.batch_max_instances, max_bytes
            )
            if batch:
                await self._deliver(batch)
                return False
        finally:
            if hold is not None:
                hold.probing = False
        try:
            due = await self._spool(self.spool.next_due_in)
        except sqlite3.Error as exc:
            self.problems.set("spool", f"cannot read the spool: {type(exc).__name__}: {exc}")
            raise
        await self._wait_wake(IDLE_POLL if due is None else min(IDLE_POLL, max(due, 0.05)))
        return True

    async def _wait_wake(self, seconds: float) -> None:
        """Sleep until an instance is queued or ``seconds`` pass."""
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def _held(self, reason: str) -> None:
        """The archive refused our configuration: start (or extend) the hold; logged
        once per outage, and again only if the reason changes."""
        now = time.monotonic()
        hold = self._hold
        if hold is None:
            hold = self._hold = Hold(reason, now, self.cfg.retry_base_seconds)
            log.error(
                "delivery held: %s; nothing is dead, queued instances wait and one batch is"
                " retried every %g s at most until the archive accepts it",
                reason,
                self.cfg.retry_max_seconds,
            )
        else:
            if reason != hold.reason:
                log.error("delivery still held, now because: %s", reason)
                hold.reason = reason
            hold.pause = min(hold.pause * 2, self.cfg.retry_max_seconds)
            log.debug("delivery still held (%s); next try in %.1f s at most", reason, hold.pause)
        hold.next_probe = now + hold.pause * random.uniform(0.5, 1.0)
        self.problems.set("archive", f"delivery held: {reason}")

    def _release_hold(self) -> None:
        """The archive answered something other than a configuration refusal."""
        if self._hold is None:
            return
        log.warning("delivery resumed: the archive no longer refuses us (held %.0f s)", time.monotonic() - self._hold.started)
        self._hold = None
        self.problems.clear("archive")
        self._wake.set()

    async def _deliver(self, batch: list[SpooledInstance]) -> None:
        study = batch[0].study_uid
        started = time.monotonic()
        self.metrics.delivery_attempts.labels(self.upstream.kind).inc(len(batch))
        try:
            damaged = await self._spool(self.spool.check, batch)
            sound = [i for i in batch if i.id not in damaged]
            answers = await self.upstream.store_instances(study, [i.item() for i in sound]) if sound else []
            outcomes = [Outcome(i.id, a.kind, a.error, a.retry_after, a.not_primary) for i, a in zip(sound, answers, strict=True)]
            outcomes += [Outcome(i, "rejected", why) for i, why in damaged.items()]
        except asyncio.CancelledError:
            await asyncio.shield(self._spool(self.spool.release, batch))
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in one upstream must not stop the queue
            log.exception("upstream store failed unexpectedly for study %s", study)
            outcomes = [Outcome(i.id, "retry", f"{type(exc).__name__}: {exc}") for i in batch]
        states = await self._record(batch, outcomes)
        for o in outcomes:
            self.metrics.delivery_outcomes.labels(self.upstream.kind, o.kind, states.get(o.instance_id, "unknown")).inc()
        refusal = next((o.error for o in outcomes if o.kind == "config"), None)
        if refusal is None and self._hold is not None and outcomes and all(o.kind == "retry" for o in outcomes):
            # Unreachable or a 5xx: no word on our configuration, so the hold stands
            # (released, it would log a recovery and then the same outage again).
            refusal = self._hold.reason
        if refusal is not None:
            self._held(refusal)
        else:
            self._release_hold()
        elapsed = time.monotonic() - started
        by_id = {i.id: i for i in batch}
        delivered = [o for o in outcomes if states.get(o.instance_id) == "delivered"]
        if delivered and self.on_delivered is not None:
            self.on_delivered(study, [(by_id[o.instance_id].series_uid, by_id[o.instance_id].sop_instance_uid) for o in delivered])
        if self.audit is not None:
            refused = sum(1 for o in outcomes if states.get(o.instance_id) == "dead")
            tally = tally_of((study, by_id[o.instance_id].sop_class_uid) for o in delivered)
            self.audit.delivered(tally, len(delivered), refused)
        if delivered:
            log.info(
                "delivered %d instance(s) of study %s to %s in %.2f s",
                len(delivered),
                study,
                self.upstream.kind,
                elapsed,
                extra={"fields": {
                    "event": "delivery", "outcome": "delivered", "study_uid": study, "instances": len(delivered),
                    "upstream": self.upstream.kind, "seconds": round(elapsed, 3),
                }},
            )
        self._log_failures(study, by_id, outcomes, states)
        if delivered and self.cfg.retain_delivered_hours == 0:
            await self._spool(self.spool.purge_delivered, 0.0)
        if delivered and self.spool.needs_eviction():
            await self._evict()

    def _log_failures(
        self, study: str, by_id: dict[int, SpooledInstance], outcomes: list[Outcome], states: dict[int, str]
    ) -> None:
        """Each dead instance gets an ERROR line of its own: someone must look at it.

        Instances to be retried are said in one WARNING per batch and reason, at most
        `BURST` a minute: through an archive outage every queued instance fails again at
        each of its retries, and a line per instance and attempt (some 3,500 lines in 30
        s for 300 instances retried every few seconds) buried everything else. Each
        instance's attempt stays in `spool list` and at DEBUG.
        """
        retried: dict[str, list[SpooledInstance]] = {}
        for o in outcomes:
            state = states.get(o.instance_id)
            if state == "delivered" or o.kind == "config":
                continue  # a configuration refusal is logged once, by _held
            inst = by_id[o.instance_id]
            fields = {
                "event": "delivery", "outcome": state, "sop_instance_uid": inst.sop_instance_uid,
                "spool_id": inst.id, "attempt": inst.attempts, "error": o.error,
            }
            if state == "dead":
                log.error(
                    "instance %s (spool id %d, attempt %d) is dead: %s",
                    inst.sop_instance_uid, inst.id, inst.attempts, o.error, extra={"fields": fields},
                )
                continue
            log.debug(
                "instance %s (spool id %d, attempt %d) will be retried: %s",
                inst.sop_instance_uid, inst.id, inst.attempts, o.error, extra={"fields": fields},
            )
            retried.setdefault(o.error, []).append(inst)
        for error, insts in retried.items():
            said, held = self._retry_lines.admit()
            if not said:
                continue
            attempts = sorted({i.attempts for i in insts})
            log.warning(
                "%d instance(s) of study %s will be retried (spool ids %s, attempt %s): %s%s",
                len(insts), study, id_ranges([i.id for i in insts]),
                attempts[0] if len(attempts) == 1 else f"{attempts[0]}-{attempts[-1]}", error, left_out(held),
                extra={"fields": {
                    "event": "delivery", "outcome": "failed", "study_uid": study, "instances": len(insts),
                    "spool_ids": [i.id for i in insts], "error": error,
                }},
            )

    async def _evict(self) -> None:
        """Delete delivered files, oldest first, to keep the spool under its cap."""
        evicted = await self._spool(self.spool.evict_delivered)
        if evicted:
            log.info("evicted %d delivered instance(s) to keep the spool under spool.max_size_mb", evicted)

    async def _record(self, batch: list[SpooledInstance], outcomes: list[Outcome]) -> dict[int, str]:
        """Record what the archive said, retrying until the spool database takes it.

        The archive has already acted on the batch, so the outcome is kept in memory
        rather than the rows released: releasing needs the same database, and sending
        again what was delivered is only acceptable after a crash.
        """
        ids = ", ".join(str(i.id) for i in batch)
        pause = RETRY_PAUSE
        told = False  # each batch held is named once; its retries, with every other's, once a minute
        while True:
            try:
                return await asyncio.shield(self._write("record delivery outcomes", self.spool.record, batch, outcomes))
            except sqlite3.Error as exc:
                said, held = (True, 0) if not told else self._record_errors.admit()
                told = True
                if said:
                    log.error(
                        "cannot record the outcome for spool ids %s (%s: %s); kept, retrying in %.1f s%s",
                        ids, type(exc).__name__, exc, pause, left_out(held),
                    )
            except Exception:  # noqa: BLE001 - whatever it is, the outcome must not be lost
                log.exception("cannot record the outcome for spool ids %s; kept, retrying in %.1f s", ids, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, IDLE_POLL)

    async def _purger(self) -> None:
        retain = self.cfg.retain_delivered_hours * 3600
        while not self._stopping:
            try:
                removed = await self._spool(self.spool.purge_delivered, retain)
                if removed:
                    log.info("purged %d delivered instance(s) from the spool", removed)
                if self.spool.needs_eviction():
                    await self._evict()
            except Exception:
                log.exception("spool purge failed")
            try:
                await asyncio.wait_for(self._stop.wait(), PURGE_INTERVAL)
            except asyncio.TimeoutError:
                pass
