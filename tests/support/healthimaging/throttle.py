"""Per-operation throttling at HealthImaging's default quotas (developer guide,
"AWS HealthImaging throttling limits"): a token bucket per operation refilled at the
throttle rate up to the burst; a request finding it empty is refused with 429
ThrottlingException. ``scale`` multiplies every rate and burst so a test can reach
the limits with a few requests; an operation with no published quota is not limited.
"""

from __future__ import annotations

import threading
import time

# operation: (requests per second, burst)
QUOTAS: dict[str, tuple[float, float]] = {
    "GetDICOMInstance": (50, 100),
    "GetDICOMInstanceMetadata": (50, 100),
    "GetDICOMInstanceFrames": (50, 100),
    "GetDICOMSeriesMetadata": (50, 100),
    "SearchImageSets": (25, 50),
    "GetImageSet": (25, 50),
    "GetImageSetMetadata": (50, 100),
    "GetImageFrame": (1000, 2000),
    "ListImageSetVersions": (25, 50),
}


class Throttle:
    """Token buckets for every operation in ``quotas``."""

    def __init__(self, scale: float = 1.0, quotas: dict[str, tuple[float, float]] | None = None) -> None:
        self.limits = {op: (rate * scale, max(1.0, burst * scale)) for op, (rate, burst) in (quotas or QUOTAS).items()}
        self._tokens = {op: burst for op, (_, burst) in self.limits.items()}
        self._stamp = {op: time.monotonic() for op in self.limits}
        self._lock = threading.Lock()
        self.refused: dict[str, int] = {}

    def allow(self, operation: str) -> bool:
        """Take a token for one request; False when the bucket is empty."""
        if operation not in self.limits:
            return True
        rate, burst = self.limits[operation]
        with self._lock:
            now = time.monotonic()
            tokens = min(burst, self._tokens[operation] + (now - self._stamp[operation]) * rate)
            self._stamp[operation] = now
            if tokens < 1.0:
                self._tokens[operation] = tokens
                self.refused[operation] = self.refused.get(operation, 0) + 1
                return False
            self._tokens[operation] = tokens - 1.0
            return True
