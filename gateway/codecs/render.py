"""Render a decoded frame to PNG or JPEG for thumbnails and rendered DICOMweb."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import convert_color_space

from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF"}
_JPEG_QUALITY = 90


def render_frame(
    arr: np.ndarray,
    desc: PixelDescription,
    fmt: str = "png",
    window: tuple[float, float] | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int = _JPEG_QUALITY,
) -> bytes:
    """Return `arr` as an 8-bit PNG, JPEG or GIF image.

    Monochrome frames are windowed with `window` = (center, width) in the
    frame's own (stored) value units, or stretched from min to max when no
    window is given; MONOCHROME1 is inverted so that it displays correctly.
    Colour frames must be RGB or YBR_FULL; samples wider than 8 bits are
    scaled down from Bits Stored. ``viewport`` (columns, rows) scales the image to fit
    within it, keeping its aspect ratio (PS3.18 8.3.5.1.3); ``quality`` is JPEG's.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    if not isinstance(arr, np.ndarray) or arr.shape != desc.shape:
        shape = getattr(arr, "shape", type(arr).__name__)
        raise ValueError(f"arr must be an array of shape {desc.shape}, got {shape}")
    if desc.samples_per_pixel == 1:
        image = Image.fromarray(_monochrome(arr, desc, window))
    else:
        image = Image.fromarray(_colour(arr, desc))
    if viewport is not None:
        width, height = viewport
        if width < 1 or height < 1:
            raise ValueError(f"viewport must be positive, got {viewport}")
        scale = min(width / image.width, height / image.height)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    options = {"quality": max(1, min(int(quality), 100))} if fmt == "jpeg" else {}
    image.save(buffer, format=_FORMATS[fmt], **options)
    return buffer.getvalue()


def window_from_dataset(ds: Dataset) -> tuple[float, float] | None:
    """First Window Center/Width of `ds`, converted to stored pixel units.

    Windows are defined on rescaled (modality) values; undoing Rescale
    Slope/Intercept lets render_frame window the raw decoded frame.
    """
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return (float(center) - intercept) / slope, float(width) / abs(slope)


def _first(value: object) -> object:
    if isinstance(value, MultiValue):
        return value[0] if len(value) else None
    return None if value == "" else value


def _monochrome(
    arr: np.ndarray, desc: PixelDescription, window: tuple[float, float] | None
) -> np.ndarray:
    if desc.photometric_interpretation == "PALETTE COLOR":
        raise TranscodeError(
            "PALETTE COLOR frames need their palette: apply "
            "pydicom.pixels.apply_color_lut before rendering"
        )
    values = arr.astype(np.float64)
    if window is None:
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    else:
        center, width = window
        if width < 1:
            raise ValueError(f"window width must be >= 1, got {width}")
        # PS3.3 C.11.2.1.2.1 linear function; width 1 is a threshold.
        if width == 1:
            scaled = (values > center - 0.5).astype(np.float64)
        else:
            scaled = (values - (center - 0.5)) / (width - 1) + 0.5
    out = np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)
    if desc.photometric_interpretation == "MONOCHROME1":
        out = 255 - out
    return out


def _colour(arr: np.ndarray, desc: PixelDescription) -> np.ndarray:
    pi = desc.photometric_interpretation
    if pi not in ("RGB", "YBR_FULL"):
        raise TranscodeError(
            f"cannot render Photometric Interpretation {pi}; decode with as_rgb=True"
        )
    if desc.bits_stored > 8:
        shift = desc.bits_stored - 8
        arr = np.clip(arr.astype(np.int64) >> shift, 0, 255)
    rgb = arr.astype(np.uint8)
    if pi == "YBR_FULL":
        rgb = convert_color_space(rgb, "YBR_FULL", "RGB")
    return rgb
