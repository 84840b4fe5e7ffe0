"""Archives behind the gateway, all behind the `Upstream` protocol."""

from __future__ import annotations

from gateway.config import Config
from gateway.upstream.base import Upstream


def make_upstream(cfg: Config) -> Upstream:
    """The upstream the config names."""
    if cfg.upstream.type == "dicomweb":
        from gateway.upstream.dicomweb import DicomWebUpstream

        return DicomWebUpstream(cfg.upstream)
    from gateway.upstream.local import LocalUpstream

    return LocalUpstream(cfg.spool.directory)
