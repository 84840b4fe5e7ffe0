"""Typed failures of an upstream archive; the edges map them to DIMSE statuses and HTTP codes."""

from __future__ import annotations


class UpstreamError(Exception):
    """Base class: something went wrong talking to the archive."""


class UpstreamUnavailable(UpstreamError):
    """Transient: connection refused, timeout, 5xx, 429, 408. Worth retrying."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UpstreamRejected(UpstreamError):
    """Permanent: the archive understood the request and refused it (4xx)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class UpstreamAuthError(UpstreamRejected):
    """401 or 403: our credentials are wrong or lack a permission."""


class NotFound(UpstreamError):
    """The study, series, instance or frame does not exist upstream."""
