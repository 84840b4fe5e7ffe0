"""Where OHIF Viewer 3's prebuilt application is: ``scripts/install-test-deps.sh`` packs
the npm package ``@ohif/app`` at this version into ``OHIF_CACHE`` once, and tests serve
its ``dist/`` (the files a site deploying the viewer serves) from a loopback site."""

from __future__ import annotations

from pathlib import Path

OHIF_VERSION = "3.13.2"
OHIF_CACHE = Path("/var/cache/dicom-gateway/ohif")


def ohif_dist() -> Path:
    """The unpacked ``dist/`` of ``@ohif/app`` at ``OHIF_VERSION``."""
    return OHIF_CACHE / OHIF_VERSION / "package" / "dist"
