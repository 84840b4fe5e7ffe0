"""Loopback port helpers and polling for tests that start real servers.

Every server a test starts listens on a port handed out by `free_port`, never a fixed
one, so that the workers of a parallel run and leftovers from a crashed run never
collide.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


#: Ports below the kernel's ephemeral range (32768 up, where outgoing connections and
#: binds to port 0 take theirs), shared out between pytest-xdist's workers.
_FIRST, _END = 10000, 32768


def _share() -> Iterator[int]:
    """This process's slice of the ports, in order: worker ``gwN`` of ``M`` takes the
    N-th of M equal slices; a run without workers takes them all."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    span = (_END - _FIRST) // count
    first = _FIRST + int(worker.removeprefix("gw")) * span
    return iter(range(first, first + span))


_NEXT = _share()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, that this process has
    not handed out before, and that no other worker of the run hands out.

    The socket is closed before returning and the port is given to a server started
    later. Asking the kernel for port 0 here once made two servers collide: it hands
    the same free port to binds in a row (an Orthanc got one port for its DICOM and its
    HTTP server), and nothing would stop it doing so to two workers of a parallel run.
    So each process walks its own slice, below the ephemeral range, and skips any port
    something holds (a listener, a connection in TIME_WAIT from an earlier run).
    """
    for port in _NEXT:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port left in this test process's share of {_FIRST}-{_END - 1}")


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
