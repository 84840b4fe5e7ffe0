"""The daemon: one asyncio process running the SCP, the forwarder and the web app.

Start order makes the gateway safe to talk to as soon as it listens: spool locked and
recovered, upstream opened, forwarder running, HTTP up, and only then the DIMSE port.
Stop order is the reverse, each step bounded by ``dimse.shutdown_grace``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.audit.auditor import Auditor, audit_trail
from gateway.config import Config, ConfigError, load_config
from gateway.connection_cap import ConnectionCap, ensure_open_files
from gateway.dimse.command import C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ, N_ACTION_RQ, STORAGE_COMMITMENT
from gateway.dimse.commitment import CommitmentService
from gateway.dimse.find import FIND_SOP_CLASSES, FindService
from gateway.dimse.get import GET_SOP_CLASSES, GetService
from gateway.dimse.move import MOVE_SOP_CLASSES, MoveService
from gateway.dimse.routing import RouteSenders
from gateway.dimse.identity import ProviderUnavailable, TokenCheck, TokenUser
from gateway.dimse.server import UNCOMPRESSED, DimseServer
from gateway.dimse.store import StoreService
from gateway.metrics import Metrics
from gateway.listening import endpoint
from gateway.reload import changed, merge
from gateway.retrieval.engine import Retriever
from gateway.spool.forwarder import Forwarder
from gateway.spool.lock import SpoolLock
from gateway.spool.queue import STATES, Spool
from gateway.systemd import feed_watchdog, report_status, sd_notify, watchdog_interval
from gateway.upstream import make_upstream
from gateway.web.app import create_app
from gateway.web.capped_site import CappedSite
from gateway.web.keys import CACHE
from gateway.web.malformed_requests import install as log_malformed_requests_briefly
from gateway.web.metrics import AuditCollector, SpoolCollector
from gateway.web.oidc import KeysUnavailable, TokenVerifier

log = logging.getLogger("gateway.daemon")


def token_user(config: Config) -> TokenCheck | None:
    """The check of a JSON Web Token a DIMSE association names its user by
    (``dimse.user_identity.jwt``): the facade's own OpenID Connect check, the same
    provider, audience and required scopes, and its write scopes for C-STORE. Made
    whenever ``[http.auth.oidc]`` is set, so a reload that turns ``jwt`` on finds it."""
    if config.http.auth.oidc is None:
        return None
    verifier = TokenVerifier(config.http.auth.oidc)

    async def check(token: str) -> TokenUser | None:
        try:
            admission = await verifier.admit(token)
        except KeysUnavailable as exc:
            raise ProviderUnavailable(str(exc)) from None
        return TokenUser(admission.user, verifier.may_write(admission)) if admission is not None else None

    return check


async def run(config: Config, config_path: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly; SIGHUP reloads what
    `gateway.reload` allows from ``config_path``.

    The spool lock comes before anything else touches the spool directory: a second
    daemon started on it by mistake raises SpoolLocked having changed nothing.
    """
    with SpoolLock(config.spool.directory):
        await _run(config, config_path)


async def _reload_audit(audit: Auditor, config: Config) -> bool:
    """Send audit messages from now on where the reloaded ``[audit]`` says. The trail
    it replaces sends what it holds first (closing waits up to 5 s, so in a worker
    thread); its counts go on in the metrics. False when the new trail cannot be made:
    the running one stays."""
    try:
        trail = audit_trail(config)
    except (OSError, ValueError) as exc:
        log.error("audit trail not reloaded, the running one stays: %s", exc)
        return False
    old = audit.swap(trail)
    if old is not None:
        await asyncio.get_running_loop().run_in_executor(None, old.close)
        audit.retire(old)
    return True


async def _run(config: Config, config_path: Path | None) -> None:
    loop = asyncio.get_running_loop()
    # Before anything listens or says READY=1: from then on systemd (or an admin) may
    # stop or reload the daemon, and a signal with no handler yet took the default
    # action, killing it where it stood. A stop asked during start-up is carried out
    # once the start is complete; a reload, once the daemon runs.
    stop = asyncio.Event()
    reload_asked = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
    ensure_open_files(config.dimse.max_connections + config.http.max_connections)
    audit = Auditor(config, audit_trail(config))
    audit.started()
    spool = Spool(config.spool, config.dimse.routes)

    def withdrawn(study_uid: str, count: int) -> None:
        """The rest of an administrator's `spool discard`: its CLI audited what it took."""
        loop.call_soon_threadsafe(
            audit.deleted, audit.me, study_uid, True,
            f"spool discard: {count} instance(s) acknowledged before it withdrawn as their rows were written",
        )

    spool.on_withdrawn = withdrawn
    requeued, adopted = spool.recover()
    spool.start()
    if requeued:
        log.warning("requeued %d instance(s) or route copies left in 'sending' by an unclean stop", requeued)
    if adopted:
        log.warning("adopted %d spooled file(s) whose rows were lost; they are queued", adopted)
    # One registry per daemon, never the process-wide default.
    metrics = Metrics()
    metrics.registry.register(SpoolCollector(spool))
    metrics.registry.register(AuditCollector(audit))
    upstream = make_upstream(config, metrics)
    await upstream.start()
    # With ack = "delivered" every C-STORE waits for its own delivery: never linger.
    linger = 0.0 if config.dimse.ack == "delivered" else config.spool.batch_linger_ms / 1000
    forwarder = Forwarder(spool, upstream, config.spool, linger, metrics, audit)
    retriever = Retriever(config, upstream, metrics)
    routes = RouteSenders(config, spool, retriever.transcoder, metrics, audit)

    def queued() -> None:
        forwarder.wake()
        routes.wake()

    def on_enqueue() -> None:
        loop.call_soon_threadsafe(queued)

    spool.on_enqueue = on_enqueue

    def index_problem(reason: str | None) -> None:
        if reason is None:
            loop.call_soon_threadsafe(forwarder.problems.clear, "spool index")
        else:
            loop.call_soon_threadsafe(forwarder.problems.set, "spool index", reason)

    spool.on_index_problem = index_problem
    await forwarder.start()

    routes.start()
    # A facade answer still streaming at stop gets the same grace as an association.
    app = create_app(config, spool, upstream, retriever, forwarder.problems, metrics, audit)
    cache = app[CACHE]
    if cache is not None:  # a delivered instance changes its study's and series' metadata
        forwarder.on_delivered = cache.forget_stored
    log_malformed_requests_briefly()
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=config.dimse.shutdown_grace,
        # aiohttp's default (3630 s) lets a client that sends nothing, or trickles a
        # request's headers, hold a connection for an hour.
        keepalive_timeout=config.http.idle_timeout,
    )
    await runner.setup()
    store = StoreService(config, spool)
    commitment = CommitmentService(config, spool, upstream, metrics)
    services: dict[int, Any] = {
        C_STORE_RQ: store,
        C_FIND_RQ: FindService(config, upstream),
        C_MOVE_RQ: MoveService(config, retriever),
        C_GET_RQ: GetService(config, retriever),
        N_ACTION_RQ: commitment,
    }
    server = DimseServer(
        config, spool.receive, services, dict.fromkeys(FIND_SOP_CLASSES + MOVE_SOP_CLASSES + GET_SOP_CLASSES + (STORAGE_COMMITMENT,), UNCOMPRESSED),
        metrics,
        spool.space_problem,
        audit,
        token_user(config),
    )
    started = False
    keepers: list[asyncio.Task[None]] = []  # systemd watchdog, status line, reloads
    try:
        https = config.http.tls.server_context() if config.http.tls is not None else None
        cap = ConnectionCap("HTTP", "http.max_connections", config.http.max_connections, metrics)
        await CappedSite(
            runner, config.http.host, config.http.port, cap, ssl_context=https, handshake_timeout=config.http.idle_timeout
        ).start()
        await server.start()
        started = True
        commitment.resume()
        log.info(
            "listening: DIMSE %s on %s%s, HTTP%s on %s, upstream %s, spool %s",
            config.dimse.ae_title,
            endpoint(config.dimse.host, config.dimse.port),
            f" and TLS on {config.dimse.tls.port}" if config.dimse.tls is not None else "",
            "S" if https is not None else "",
            endpoint(config.http.host, config.http.port),
            config.upstream.type + (f" {config.upstream.url}" if config.upstream.url else ""),
            config.spool.directory,
        )
        sd_notify("READY=1")
        interval = watchdog_interval()
        if interval is not None:
            keepers.append(asyncio.create_task(feed_watchdog(interval), name="systemd-watchdog"))

        async def status_line() -> str:
            status = await loop.run_in_executor(None, spool.status)
            counts = ", ".join(f"{status['counts'][state]} {state}" for state in STATES)
            return f"spool: {counts}; {server.association_count} association(s) open"

        keepers.append(asyncio.create_task(report_status(status_line), name="systemd-status"))
        running = [config]  # the config in force, replaced by each reload

        async def reload() -> None:
            """Re-read the config file and apply what can change without a restart."""
            assert config_path is not None
            try:
                loaded = await loop.run_in_executor(None, load_config, config_path)
            except ConfigError as exc:
                log.error("reload refused, the running configuration stays: %s", "; ".join(exc.problems))
                return
            merged, needs_restart = merge(running[0], loaded)
            applied = changed(running[0], merged)
            if merged.audit != running[0].audit and not await _reload_audit(audit, merged):
                merged = dataclasses.replace(merged, audit=running[0].audit)
                applied = changed(running[0], merged)
            running[0] = merged
            for service in (server, store, *services.values(), retriever, routes):
                service.config = merged
            spool.set_limits(merged.spool)
            spool.routes = merged.dimse.routes
            routes.reconfigure()
            logging.getLogger().setLevel(merged.logging.level)
            log.warning(
                "configuration reloaded from %s: %s%s", config_path, ", ".join(applied) or "nothing changed",
                f"; a restart is needed for {', '.join(needs_restart)}" if needs_restart else "",
            )

        async def reload_when_asked() -> None:
            """One reload at a time: SIGHUPs arriving during one make one more."""
            while True:
                await reload_asked.wait()
                reload_asked.clear()
                try:
                    await reload()
                except Exception:  # noqa: BLE001 - the next SIGHUP must still be heard
                    log.exception("reload failed, the running configuration stays")

        if config_path is not None:
            keepers.append(asyncio.create_task(reload_when_asked(), name="reload"))
        await stop.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
    finally:
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        grace = config.dimse.shutdown_grace
        if started:
            await server.stop(grace)
        await commitment.stop()
        spool.release_waiters()
        store.close()
        spool.on_enqueue = lambda: None
        spool.on_index_problem = lambda reason: None
        spool.on_withdrawn = lambda study_uid, count: None
        await forwarder.stop(grace)
        await routes.stop(grace)
        await runner.cleanup()
        retriever.close()  # after the facade's last request: it converts on these threads
        await upstream.close()
        spool.close()
        audit.stopped()
        if audit.trail is not None:
            audit.trail.close()
        log.info("stopped")
