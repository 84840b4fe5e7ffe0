"""At most a few lines a minute for warnings any client can cause at will.

A malformed HTTP request, or a connection that breaks off before its association, is
worth a warning naming the client; ten thousand of them a second (a scanner, a broken
client in a loop) would fill the disk and trip journald's rate limit, which then drops
the lines that matter. A `Throttle` lets the first `BURST` lines of a minute through
and counts the rest; the next line let through says how many were left out.
"""

from __future__ import annotations

import threading
import time

BURST = 10  # lines let through per window
WINDOW = 60.0  # seconds


class Throttle:
    """One kind of warning's allowance."""

    def __init__(self, burst: int = BURST, window: float = WINDOW) -> None:
        self.burst = burst
        self.window = window
        self._lock = threading.Lock()
        self._started = -window
        self._passed = 0
        self._held = 0

    def admit(self) -> tuple[bool, int]:
        """Whether to log this line, and how many lines were left out before it (to
        be said with it)."""
        with self._lock:
            now = time.monotonic()
            if now - self._started >= self.window:
                self._started, self._passed = now, 0
            if self._passed < self.burst:
                self._passed += 1
                held, self._held = self._held, 0
                return True, held
            self._held += 1
            return False, 0


def left_out(count: int) -> str:
    """The words a line adds for the lines left out before it."""
    return f" ({count} more like it not logged since the last one that was)" if count else ""
