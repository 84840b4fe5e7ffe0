"""The daemon: one asyncio process running the SCP, the forwarder and the web app.

Start order makes the gateway safe to talk to as soon as it listens: spool locked and
recovered, upstream opened, forwarder running, HTTP up, and only then the DIMSE port.
Stop order is the reverse, each step bounded by ``dimse.shutdown_grace``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

from aiohttp import web

from gateway.config import Config
from gateway.dimse.command import C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ
from gateway.dimse.find import FIND_SOP_CLASSES, FindService
from gateway.dimse.get import GET_SOP_CLASSES, GetService
from gateway.dimse.move import MOVE_SOP_CLASSES, MoveService
from gateway.dimse.server import UNCOMPRESSED, DimseServer
from gateway.dimse.store import StoreService
from gateway.retrieval.engine import Retriever
from gateway.spool.forwarder import Forwarder
from gateway.spool.lock import SpoolLock
from gateway.spool.queue import Spool
from gateway.upstream import make_upstream
from gateway.web.app import create_app

log = logging.getLogger("gateway.daemon")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.warning("systemd notify failed: %s", exc)


async def run(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down cleanly.

    The spool lock comes before anything else touches the spool directory: a second
    daemon started on it by mistake raises SpoolLocked having changed nothing.
    """
    with SpoolLock(config.spool.directory):
        await _run(config)


async def _run(config: Config) -> None:
    loop = asyncio.get_running_loop()
    spool = Spool(config.spool)
    requeued, adopted = spool.recover()
    if requeued:
        log.warning("requeued %d instance(s) left in 'sending' by an unclean stop", requeued)
    if adopted:
        log.warning("adopted %d spooled file(s) whose rows were lost; they are queued", adopted)
    upstream = make_upstream(config)
    await upstream.start()
    # With ack = "delivered" every C-STORE waits for its own delivery: never linger.
    linger = 0.0 if config.dimse.ack == "delivered" else config.spool.batch_linger_ms / 1000
    forwarder = Forwarder(spool, upstream, config.spool, linger)
    spool.on_enqueue = lambda: loop.call_soon_threadsafe(forwarder.wake)
    await forwarder.start()

    retriever = Retriever(config, upstream)
    # A facade answer still streaming at stop gets the same grace as an association.
    runner = web.AppRunner(
        create_app(config, spool, upstream, retriever, forwarder.problems),
        access_log=None,
        shutdown_timeout=config.dimse.shutdown_grace,
    )
    await runner.setup()
    store = StoreService(config, spool)
    services = {
        C_STORE_RQ: store,
        C_FIND_RQ: FindService(config, upstream),
        C_MOVE_RQ: MoveService(config, retriever),
        C_GET_RQ: GetService(config, retriever),
    }
    server = DimseServer(
        config, spool.incoming, services, dict.fromkeys(FIND_SOP_CLASSES + MOVE_SOP_CLASSES + GET_SOP_CLASSES, UNCOMPRESSED)
    )
    started = False
    try:
        await web.TCPSite(runner, config.http.host, config.http.port).start()
        await server.start()
        started = True
        log.info(
            "listening: DIMSE %s on %s:%d, HTTP on %s:%d, upstream %s, spool %s",
            config.dimse.ae_title,
            config.dimse.host,
            config.dimse.port,
            config.http.host,
            config.http.port,
            config.upstream.type + (f" {config.upstream.url}" if config.upstream.url else ""),
            config.spool.directory,
        )
        sd_notify("READY=1")
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
    finally:
        grace = config.dimse.shutdown_grace
        if started:
            await server.stop(grace)
        spool.release_waiters()
        store.close()
        spool.on_enqueue = lambda: None
        await forwarder.stop(grace)
        await runner.cleanup()
        retriever.close()  # after the facade's last request: it converts on these threads
        await upstream.close()
        spool.close()
        log.info("stopped")
