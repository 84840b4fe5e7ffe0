"""Typed failures of an upstream archive; the edges map them to DIMSE statuses and HTTP codes."""

from __future__ import annotations


class UpstreamError(Exception):
    """Base class: something went wrong talking to the archive."""


class UpstreamUnavailable(UpstreamError):
    """Transient: connection refused, timeout, 5xx, 429, 408. Worth retrying.
    ``status``: the HTTP status the archive answered with; 0 when it did not answer."""

    def __init__(self, message: str, retry_after: float | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class UpstreamRejected(UpstreamError):
    """Permanent: the archive understood the request and refused it (4xx)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class AnswerTooLarge(UpstreamRejected):
    """The archive's answer passed the bound set on what is held in memory whole
    (``upstream.max_answer_mb``, or a smaller fixed one for tokens and key sets)."""

    def __init__(self, what: str, limit: int, setting: str = "upstream.max_answer_mb") -> None:
        mib = 1024 * 1024
        size = f"{limit // mib} MiB" if limit % mib == 0 else f"{limit} bytes"
        super().__init__(f"the {what} answer is larger than {size}" + (f" ({setting})" if setting else ""))


class UnusableInstance(UpstreamRejected):
    """The archive's answer for an instance is not that instance, whole: cut off,
    malformed, or another instance, study or series than asked (502 on the facade)."""


class UpstreamAuthError(UpstreamRejected):
    """401 or 403: our credentials are wrong or lack a permission."""


class NotSupported(UpstreamRejected):
    """The archive cannot do this at all (its `Capabilities` say so, or it answered
    405 or 501): asking again will not help, another way (or none) must be taken.
    A refusal like any other to callers that only know `UpstreamRejected`."""


class NotFound(UpstreamError):
    """The study, series, instance or frame does not exist upstream."""


class SearchTruncated(UpstreamError):
    """Raised by a search iterator after its last result: the archive holds more
    matches than it let us page to (it announced more results with a PS3.18 Warning
    and then sent none, or the search reached `Capabilities.search_limit`).

    An exception rather than a flag so that no caller can end a short search with
    Success by accident; ``returned`` is how many results were handed out before.
    """

    def __init__(self, message: str, returned: int) -> None:
        super().__init__(message)
        self.returned = returned
