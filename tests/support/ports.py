"""Loopback port helpers and polling for tests that start real servers.

Every server a test starts listens on a port picked by the kernel so that
parallel runs and leftovers from a crashed run never collide on a fixed port.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


_HANDED: set[int] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, and that this
    process has not handed out before.

    The socket is closed before returning, so another process could grab the
    port in between. The kernel does hand the same port to two binds in a row
    now and then: an Orthanc once got one port for both its DICOM and its HTTP
    server and died at start-up, so ports already given are skipped.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _HANDED:
            _HANDED.add(port)
            return port


_HELD: list[socket.socket] = []


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens, and nothing will: the socket stays
    bound, without listening, until the test process ends, so connections to it are
    refused and `free_port` can never hand it to a gateway started after (a daemon
    whose archive URL pointed at its own HTTP port was once the result)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


def port_is_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Tell whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition not met",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Exceptions raised by the predicate count as "not yet" (servers that are
    still starting typically refuse connections), and the last one is chained
    to the AssertionError so a timeout still shows why the predicate failed.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except Exception as exc:  # noqa: BLE001 - any failure means "not yet"
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"{message} (waited {timeout:.1f} s)") from last_error
        time.sleep(interval)


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts TCP connections, or raise AssertionError."""
    wait_until(
        lambda: port_is_open(host, port),
        timeout=timeout,
        interval=0.05,
        message=f"nothing listening on {host}:{port}",
    )
