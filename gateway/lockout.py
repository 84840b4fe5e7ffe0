"""Failed authentications counted per client address, and the address turned away
for a while once it has too many (what a security review asks of a service that takes
passwords: the facade's Basic users' passwords and DIMSE users' passcodes can be
guessed, tokens and keys brute-forced).

Only attempts that present credentials count: a viewer's first request without any
is the normal start of a login, not an attack. Once an address reaches the limit
within a minute, its attempts are turned away (the facade answers 429 with
Retry-After, the DIMSE front rejects the association as transient) until its oldest
counted failure is a minute old, whatever credentials they carry (else guessing would
go on between the refusals). Behind a reverse proxy or NAT every client has the same
address, so one client's failures turn all away for at most a minute: set the limit
with that in mind, or 0 to count nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

WINDOW_SECONDS = 60.0
# Addresses remembered at most: a scan from many addresses cannot grow memory without bound.
MAX_ADDRESSES = 10_000


class FailedLogins:
    """Failures per address within the last WINDOW_SECONDS; ``limit`` 0 turns it off."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str, now: float) -> deque[float] | None:
        times = self._failures.get(address)
        if times is None:
            return None
        while times and now - times[0] >= WINDOW_SECONDS:
            times.popleft()
        if not times:
            del self._failures[address]
            return None
        return times

    def blocked_for(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        if not self.limit:
            return 0.0
        now = self.clock()
        times = self._recent(address, now)
        if times is None or len(times) < self.limit:
            return 0.0
        return WINDOW_SECONDS - (now - times[0])

    def failed(self, address: str) -> bool:
        """Count one failure; True when it is the one that reached the limit."""
        if not self.limit:
            return False
        now = self.clock()
        times = self._recent(address, now)
        if times is None:
            if len(self._failures) >= MAX_ADDRESSES:
                self._forget_expired(now)
            times = self._failures.setdefault(address, deque(maxlen=self.limit))
        times.append(now)
        return len(times) == self.limit

    def _forget_expired(self, now: float) -> None:
        for address in list(self._failures):
            self._recent(address, now)
        while len(self._failures) >= MAX_ADDRESSES:  # all recent: the oldest-seen address goes
            del self._failures[next(iter(self._failures))]
