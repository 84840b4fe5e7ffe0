"""Archives behind the gateway, all behind the `Upstream` protocol."""

from __future__ import annotations

from pydicom.datadict import tag_for_keyword

from gateway.config import Config
from gateway.dicomweb.qido import QidoOptions
from gateway.metrics import Metrics
from gateway.upstream.base import Upstream


def make_upstream(cfg: Config, metrics: Metrics | None = None) -> Upstream:
    """The upstream the config names; an HTTP one reports its requests to ``metrics``."""
    if cfg.upstream.type in ("dicomweb", "healthimaging"):
        f = cfg.find
        options = QidoOptions(
            page_size=f.page_size,
            timeout=f.timeout,
            relax_unsafe=f.wildcard_unsafe_characters,
            local_only=frozenset(int(tag_for_keyword(k)) for k in f.local_match_keys),  # type: ignore[arg-type]
        )
        if cfg.upstream.type == "healthimaging":
            from gateway.upstream.healthimaging import HealthImagingUpstream

            return HealthImagingUpstream(cfg.upstream, options, metrics=metrics)
        from gateway.upstream.dicomweb import DicomWebUpstream

        return DicomWebUpstream(cfg.upstream, options, metrics=metrics)
    from gateway.upstream.local import LocalUpstream

    return LocalUpstream(cfg.spool.directory, cfg.find.page_size)
