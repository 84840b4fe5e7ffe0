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

from gateway.log_throttle import Throttle, left_out
from gateway.metrics import Metrics

log = logging.getLogger("gateway.connections")

# Descriptors kept for the daemon's own use beyond both caps: spool and cache files,
# the index databases, connections to the archive and to C-MOVE destinations.
RESERVED_FILES = 256


class ConnectionCap:
    """One listener's cap: counts what it refuses, warns at most once a minute."""

    def __init__(self, listener: str, setting: str, limit: int, metrics: Metrics | None) -> None:
        self.listener = listener  # "DIMSE" or "HTTP"
        self.setting = setting  # the config key, named in the warning
        self.limit = limit
        self._metric = metrics.connections_refused.labels(listener.lower()) if metrics is not None else None
        self._throttle = Throttle(burst=1)

    def full(self, open_connections: int) -> bool:
        return open_connections >= self.limit

    def refused(self, peer: str) -> None:
        """Count a connection closed at once; the first of a minute is logged with its
        address, the next logged one says how many were not."""
        if self._metric is not None:
            self._metric.inc()
        admitted, held = self._throttle.admit()
        if admitted:
            log.warning(
                "%s: a connection from %s closed at once: %s (%d) open already%s",
                self.listener, peer, self.setting, self.limit, left_out(held),
            )


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
