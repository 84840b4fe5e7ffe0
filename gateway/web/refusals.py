"""Series whose frames the archive recently would not serve by RetrieveFrames.

Orthanc 1.10 answers HTTP 500 to RetrieveFrames in the stored syntax
(``transfer-syntax=*``) for syntaxes it cannot decode, HTJ2K among them, while it
serves the same instances whole; the facade then cuts the frames out of the instance.
Once that worked in a series, the series' other instances (a series is mostly stored
alike) go straight to the instance instead of paying for the refusal each time: a
request to the archive, and a warning in the log, per frame. The memory lasts
``seconds``, so a failure that was only transient is not held against the series for good.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class RefusedSeries:
    """``remember(key)`` after a refusal the instance made up for; ``refused(key)``."""

    def __init__(self, seconds: float = 600.0, kept: int = 10_000) -> None:
        """``kept``: the most series remembered (the oldest are forgotten first)."""
        self.seconds = seconds
        self.kept = kept
        self._until: OrderedDict[str, float] = OrderedDict()  # key -> monotonic expiry

    def refused(self, key: str) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until < time.monotonic():
            del self._until[key]
            return False
        return True

    def remember(self, key: str) -> None:
        self._until.pop(key, None)
        self._until[key] = time.monotonic() + self.seconds
        if len(self._until) > self.kept:
            del self._until[next(iter(self._until))]
