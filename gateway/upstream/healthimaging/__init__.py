"""AWS HealthImaging as an upstream: SigV4-signed DICOMweb (see `archive`)."""

from gateway.upstream.healthimaging.archive import HealthImagingUpstream

__all__ = ["HealthImagingUpstream"]
