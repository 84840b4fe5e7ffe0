"""Caps on the connections the DIMSE and HTTP listeners hold at once.

Every open connection holds a file descriptor until its timeout (``dimse.acse_timeout``
before an association, ``http.idle_timeout`` on the facade). A client opening
connections faster than they time out took every descriptor the process had: asyncio
then logged a traceback per failed accept (1,529 in seven seconds in a probe), and the
spool could open no file and the forwarder no connection to the archive. Past its cap
a listener closes a new connection as soon as it is accepted; the process's open-file
limit is raised at start to cover both caps plus a reserve for the daemon's own files
and outbound connections.
"""

from __future__ import annotations

import logging
import resource
import time

from gateway.metrics import Metrics

log = logging.getLogger("gateway.connections")

# Descriptors kept for the daemon's own use beyond both caps: spool and cache files,
# the index databases, connections to the archive and to C-MOVE destinations.
RESERVED_FILES = 256
WARN_EVERY = 60.0  # seconds between two warnings of one listener's refusals


class ConnectionCap:
    """One listener's cap: counts what it refuses, warns at most once a minute."""

    def __init__(self, listener: str, setting: str, limit: int, metrics: Metrics | None) -> None:
        self.listener = listener  # "DIMSE" or "HTTP"
        self.setting = setting  # the config key, named in the warning
        self.limit = limit
        self._metric = metrics.connections_refused.labels(listener.lower()) if metrics is not None else None
        self._unreported = 0
        self._warned_at = -WARN_EVERY

    def full(self, open_connections: int) -> bool:
        return open_connections >= self.limit

    def refused(self, peer: str) -> None:
        """Count a connection closed at once; the first after a quiet minute is logged
        with its address, the rest are summed into the next warning."""
        if self._metric is not None:
            self._metric.inc()
        self._unreported += 1
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY:
            log.warning(
                "%s: %d connection(s) closed at once, the last from %s: %s (%d) open already",
                self.listener, self._unreported, peer, self.setting, self.limit,
            )
            self._unreported, self._warned_at = 0, now


def ensure_open_files(needed: int) -> None:
    """Raise the soft open-file limit to cover ``needed`` connections plus
    `RESERVED_FILES`, up to the hard limit; warn when even that is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "the open-file limit (%d) is below the %d that dimse.max_connections and "
            "http.max_connections need with %d for the daemon's own files: raise LimitNOFILE "
            "or lower the caps",
            soft, want, RESERVED_FILES,
        )
