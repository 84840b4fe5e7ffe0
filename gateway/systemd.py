"""The systemd notify protocol (sd_notify(3)) without libsystemd: readiness, watchdog
keep-alives and a status line, as datagrams to ``$NOTIFY_SOCKET``.

The watchdog is fed from a task on the event loop, so a loop that stops turning (a
blocking call, a livelock) stops feeding it and systemd restarts the service after
``WatchdogSec``: a thread would keep feeding a daemon that no longer serves anyone.
Outside systemd (no ``NOTIFY_SOCKET``) everything here is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable

log = logging.getLogger("gateway.systemd")

STATUS_INTERVAL = 5.0  # seconds between STATUS= updates


def sd_notify(message: str) -> None:
    """Send one notification (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``)."""
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


def watchdog_interval() -> float | None:
    """Seconds between keep-alives (half of ``WatchdogSec``), or None when systemd asks
    for none, or asks another process (``WATCHDOG_PID``)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


async def feed_watchdog(interval: float) -> None:
    """Send WATCHDOG=1 every ``interval`` seconds, for as long as the loop runs it."""
    while True:
        sd_notify("WATCHDOG=1")
        await asyncio.sleep(interval)


async def report_status(status: Callable[[], Awaitable[str]], interval: float = STATUS_INTERVAL) -> None:
    """Send ``STATUS=`` with what ``status`` says (shown by ``systemctl status``) every
    ``interval`` seconds; a failing read is reported as such, and tried again."""
    while True:
        try:
            text = await status()
        except Exception as exc:  # noqa: BLE001 - the status line must not stop the daemon
            text = f"cannot read the spool: {type(exc).__name__}"
        sd_notify(f"STATUS={text}")
        await asyncio.sleep(interval)
