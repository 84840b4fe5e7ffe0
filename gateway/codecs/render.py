"""Render a decoded frame to PNG or JPEG for thumbnails and rendered DICOMweb.

A monochrome frame goes through the grayscale pipeline of PS3.4 N.2: the Modality
LUT (`Rescale`, or `ModalityLut`: an item of the Modality LUT Sequence), then a VOI
transformation (`VoiWindow`: Window Center/Width with
the VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID; or `VoiLut`: an item of the VOI
LUT Sequence), then MONOCHROME1 inversion, to 8 bits.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import convert_color_space

from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError

_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF"}
# A viewport larger than the image scales it up, but to 4096 x 4096 pixels at most (an
# image already larger is not scaled up at all): one request asking 65535 x 65535, which
# WADO-URI's ``rows`` alone implies, would otherwise make gigabytes and a minute of CPU.
MAX_UPSCALED_PIXELS = 4096 * 4096
_JPEG_QUALITY = 90
BLOCK_PIXELS = 1 << 20  # pixels put through the rendering pipeline at once
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.2, C.11.2.1.3


@dataclass(frozen=True)
class Rescale:
    """Rescale Slope/Intercept: stored values to modality values."""

    slope: float = 1.0
    intercept: float = 0.0

    def apply(self, arr: np.ndarray) -> np.ndarray:
        return arr.astype(np.float64) * self.slope + self.intercept


@dataclass(frozen=True, eq=False)
class ModalityLut:
    """An item of the Modality LUT Sequence (PS3.3 C.11.1): ``data[i]`` is the modality
    value of the stored value ``first + i``; stored values outside the table take its
    first or last entry."""

    first: int
    data: np.ndarray = field(repr=False)

    def apply(self, arr: np.ndarray) -> np.ndarray:
        index = np.clip(arr.astype(np.int64) - self.first, 0, len(self.data) - 1)
        return self.data[index].astype(np.float64)


@dataclass(frozen=True)
class VoiWindow:
    """A window of modality values and its VOI LUT Function; ``scale`` maps modality
    values to [0, 1] as PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and
    C.11.2.1.3.1 (SIGMOID) define it."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        if self.function not in VOI_FUNCTIONS:
            raise ValueError(f"VOI LUT Function must be one of {', '.join(VOI_FUNCTIONS)}, got {self.function!r}")
        if self.function == "LINEAR" and self.width < 1:
            raise ValueError(f"window width must be >= 1, got {self.width}")
        if self.width <= 0:
            raise ValueError(f"window width must be > 0, got {self.width}")

    def scale(self, x: np.ndarray) -> np.ndarray:
        c, w = self.center, self.width
        if self.function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        if self.function == "LINEAR_EXACT":
            return np.clip((x - c) / w + 0.5, 0.0, 1.0)
        if w == 1:  # the linear function's threshold case
            return (x > c - 0.5).astype(np.float64)
        return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)


@dataclass(frozen=True, eq=False)
class VoiLut:
    """An item of the VOI LUT Sequence (PS3.3 C.11.2.1.1): ``data[i]`` is the output
    for the modality value ``first + i``; values below or above the table take its
    first or last entry; outputs span ``bits`` bits."""

    first: int
    data: np.ndarray = field(repr=False)
    bits: int

    def scale(self, x: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(x) - self.first, 0, len(self.data) - 1).astype(np.int64)
        return self.data[index].astype(np.float64) / float((1 << self.bits) - 1)


def render_frame(
    arr: np.ndarray,
    desc: PixelDescription,
    fmt: str = "png",
    window: tuple[float, float] | None = None,
    viewport: tuple[int, int] | None = None,
    quality: int = _JPEG_QUALITY,
    *,
    voi: VoiWindow | VoiLut | None = None,
    rescale: Rescale | ModalityLut = Rescale(),
) -> bytes:
    """Return `arr` as an 8-bit PNG, JPEG or GIF image.

    Monochrome frames are rescaled to modality values with ``rescale`` and put
    through ``voi``; without it, windowed linearly with `window` = (center, width)
    in the frame's own (stored) value units, or stretched from min to max when
    neither is given; MONOCHROME1 is inverted so that it displays correctly.
    Colour frames must be RGB or YBR_FULL; samples wider than 8 bits are
    scaled down from Bits Stored. ``viewport`` (columns, rows) scales the image to fit
    within it, keeping its aspect ratio (PS3.18 8.3.5.1.3), up to `MAX_UPSCALED_PIXELS`
    when that means scaling up; ``quality`` is JPEG's.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    if not isinstance(arr, np.ndarray) or arr.shape != desc.shape:
        shape = getattr(arr, "shape", type(arr).__name__)
        raise ValueError(f"arr must be an array of shape {desc.shape}, got {shape}")
    if desc.samples_per_pixel == 1:
        image = Image.fromarray(_monochrome(arr, desc, window, voi, rescale))
    else:
        image = Image.fromarray(_colour(arr, desc))
    if viewport is not None:
        width, height = viewport
        if width < 1 or height < 1:
            raise ValueError(f"viewport must be positive, got {viewport}")
        scale = min(width / image.width, height / image.height)
        if scale > 1:
            scale = max(1.0, min(scale, (MAX_UPSCALED_PIXELS / (image.width * image.height)) ** 0.5))
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


def rescale_from_dataset(ds: Dataset) -> Rescale | ModalityLut:
    """The instance's Modality LUT: the first item of its Modality LUT Sequence, else
    its Rescale Slope/Intercept (identity when absent)."""
    items = ds.get("ModalityLUTSequence")
    if items:
        first, table = _table(items[0], int(ds.get("PixelRepresentation") or 0), "Modality")
        return ModalityLut(first, table)
    return Rescale(float(ds.get("RescaleSlope") or 1.0), float(ds.get("RescaleIntercept") or 0.0))


def voi_from_dataset(ds: Dataset) -> VoiWindow | VoiLut | None:
    """The instance's own VOI transformation: the first item of its VOI LUT Sequence
    (preferred when it also has a window, as pydicom's ``apply_voi_lut`` does), else
    its first Window Center/Width with its VOI LUT Function (LINEAR when absent),
    else None. ValueError for one that cannot be applied."""
    items = ds.get("VOILUTSequence")
    if items:
        return _lut_of(items[0], int(ds.get("PixelRepresentation") or 0))
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is None or width is None:
        return None
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper() or "LINEAR"
    return VoiWindow(float(center), float(width), function)  # type: ignore[arg-type]


def _lut_of(item: Dataset, pixel_representation: int) -> VoiLut:
    first, table = _table(item, pixel_representation, "VOI")
    return VoiLut(first, table, int(item.LUTDescriptor[2]))


def _table(item: Dataset, pixel_representation: int, kind: str) -> tuple[int, np.ndarray]:
    """(first value mapped, entries) of a LUT Sequence item (PS3.3 C.11.1.1.1, C.11.2.1.1)."""
    descriptor = item.get("LUTDescriptor")
    data = item.get("LUTData")
    if descriptor is None or len(descriptor) != 3 or data is None:
        raise ValueError(f"{kind} LUT Sequence item lacks its LUT Descriptor or LUT Data")
    entries, first, bits = (int(v) for v in descriptor)
    entries = entries or 65536
    if pixel_representation == 1 and first >= 0x8000:  # US-encoded but signed
        first -= 0x10000
    if isinstance(data, (bytes, bytearray)):
        table = np.frombuffer(data, "<u2")
    else:
        table = np.asarray(data if isinstance(data, (list, MultiValue)) else [data], dtype=np.int64)
    if len(table) < entries or not 1 <= bits <= 16:
        raise ValueError(f"{kind} LUT of {len(table)} entries, {bits} bits, does not match its descriptor")
    return first, table[:entries]


def _first(value: object) -> Any:
    if isinstance(value, MultiValue):
        return value[0] if len(value) else None
    return None if value == "" else value


def _monochrome(
    arr: np.ndarray,
    desc: PixelDescription,
    window: tuple[float, float] | None,
    voi: VoiWindow | VoiLut | None,
    rescale: Rescale | ModalityLut,
) -> np.ndarray:
    if desc.photometric_interpretation == "PALETTE COLOR":
        raise TranscodeError(
            "PALETTE COLOR frames need their palette: apply "
            "pydicom.pixels.apply_color_lut before rendering"
        )
    scale: Callable[[np.ndarray], np.ndarray]
    if voi is not None:
        scale = lambda block: voi.scale(rescale.apply(block))  # noqa: E731
    elif window is not None:
        linear = VoiWindow(*window)
        scale = lambda block: linear.scale(block.astype(np.float64))  # noqa: E731
    else:
        low, high = np.inf, -np.inf
        for rows in _blocks(arr):
            values = rescale.apply(arr[rows])
            low, high = min(low, float(values.min())), max(high, float(values.max()))
        if high > low:
            scale = lambda block: (rescale.apply(block) - low) / (high - low)  # noqa: E731
        else:
            scale = lambda block: np.zeros(block.shape)  # noqa: E731
    out = np.empty(arr.shape, dtype=np.uint8)
    for rows in _blocks(arr):
        out[rows] = np.clip(np.rint(scale(arr[rows]) * 255.0), 0, 255)
    if desc.photometric_interpretation == "MONOCHROME1":
        np.subtract(255, out, out=out)
    return out


def _colour(arr: np.ndarray, desc: PixelDescription) -> np.ndarray:
    pi = desc.photometric_interpretation
    if pi not in ("RGB", "YBR_FULL"):
        raise TranscodeError(
            f"cannot render Photometric Interpretation {pi}; decode with as_rgb=True"
        )
    rgb = np.empty(arr.shape, dtype=np.uint8)
    for rows in _blocks(arr):
        block = arr[rows]
        if desc.bits_stored > 8:
            block = np.clip(block.astype(np.int64) >> (desc.bits_stored - 8), 0, 255)
        block = block.astype(np.uint8)
        rgb[rows] = convert_color_space(block, "YBR_FULL", "RGB") if pi == "YBR_FULL" else block
    return rgb


def _blocks(arr: np.ndarray) -> Iterator[slice]:
    """Row ranges of about BLOCK_PIXELS pixels: the pipeline's floating-point
    temporaries (several times the frame's size) are made a block at a time, so a
    large frame costs its decoded size plus the 8-bit result, not ten times that."""
    step = max(1, BLOCK_PIXELS // max(1, arr.shape[1] if arr.ndim > 1 else 1))
    for start in range(0, arr.shape[0], step):
        yield slice(start, start + step)
