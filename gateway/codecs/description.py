"""PixelDescription: the Image Pixel module values a frame needs to be decoded.

Frames travel without their dataset in the DICOMweb facade, so the frame
functions take this small value object instead of a pydicom Dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from pydicom.dataset import Dataset

from gateway.codecs.errors import TranscodeError

_COLOUR = (
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_RCT",
    "YBR_ICT",
    "YBR_PARTIAL_420",
    "YBR_PARTIAL_422",
)
_MONO = ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR")


@dataclass(frozen=True)
class PixelDescription:
    """How one frame of pixel data is laid out.

    Validation runs on construction so a bad description fails where it is
    made, with the offending field named, not deep inside a codec.
    """

    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric_interpretation: str
    planar_configuration: int = 0

    def __post_init__(self) -> None:
        for field in ("rows", "columns"):
            value = getattr(self, field)
            if not isinstance(value, int) or not 0 < value < 65536:
                raise ValueError(f"{field} must be an int in 1..65535, got {value!r}")
        if self.samples_per_pixel not in (1, 3):
            raise ValueError(f"samples_per_pixel must be 1 or 3, got {self.samples_per_pixel!r}")
        if self.bits_allocated not in (1, 8, 16, 32, 64):
            raise ValueError(
                f"bits_allocated must be one of 1, 8, 16, 32, 64, got {self.bits_allocated!r}"
            )
        if not isinstance(self.bits_stored, int) or not (
            0 < self.bits_stored <= self.bits_allocated
        ):
            raise ValueError(
                f"bits_stored must be in 1..bits_allocated ({self.bits_allocated}), "
                f"got {self.bits_stored!r}"
            )
        if self.pixel_representation not in (0, 1):
            raise ValueError(
                "pixel_representation must be 0 (unsigned) or 1 (signed), "
                f"got {self.pixel_representation!r}"
            )
        allowed = _MONO if self.samples_per_pixel == 1 else _COLOUR
        if self.photometric_interpretation not in allowed:
            raise ValueError(
                f"photometric_interpretation {self.photometric_interpretation!r} "
                f"is not valid with samples_per_pixel={self.samples_per_pixel}; "
                f"expected one of {', '.join(allowed)}"
            )
        if self.planar_configuration not in (0, 1):
            raise ValueError(
                f"planar_configuration must be 0 or 1, got {self.planar_configuration!r}"
            )

    @classmethod
    def from_dataset(cls, ds: Dataset) -> PixelDescription:
        """Read the Image Pixel module of `ds`; raise TranscodeError if incomplete."""
        keywords = (
            "Rows",
            "Columns",
            "SamplesPerPixel",
            "BitsAllocated",
            "BitsStored",
            "PixelRepresentation",
            "PhotometricInterpretation",
        )
        missing = [kw for kw in keywords if ds.get(kw) in (None, "")]
        if missing:
            raise TranscodeError(f"dataset lacks Image Pixel attributes: {', '.join(missing)}")
        try:
            return cls(
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                samples_per_pixel=int(ds.SamplesPerPixel),
                bits_allocated=int(ds.BitsAllocated),
                bits_stored=int(ds.BitsStored),
                pixel_representation=int(ds.PixelRepresentation),
                photometric_interpretation=str(ds.PhotometricInterpretation).strip(),
                planar_configuration=int(ds.get("PlanarConfiguration") or 0),
            )
        except ValueError as exc:
            raise TranscodeError(f"dataset has an invalid Image Pixel module: {exc}") from exc

    @classmethod
    def from_pixel_properties(cls, props: Mapping[str, Any]) -> PixelDescription:
        """Build from the dict pydicom's decoders return next to each array."""
        return cls(
            rows=int(props["rows"]),
            columns=int(props["columns"]),
            samples_per_pixel=int(props["samples_per_pixel"]),
            bits_allocated=int(props["bits_allocated"]),
            bits_stored=int(props["bits_stored"]),
            pixel_representation=int(props["pixel_representation"]),
            photometric_interpretation=str(props["photometric_interpretation"]),
            planar_configuration=int(props.get("planar_configuration") or 0),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one decoded frame: (rows, columns[, samples])."""
        if self.samples_per_pixel == 1:
            return (self.rows, self.columns)
        return (self.rows, self.columns, self.samples_per_pixel)

    @property
    def dtype(self) -> np.dtype:
        """Native-endian dtype of one decoded sample (1-bit data unpacks to 8)."""
        size = max(self.bits_allocated // 8, 1)
        kind = "i" if self.pixel_representation else "u"
        return np.dtype(f"{kind}{size}")

    def pydicom_options(self) -> dict[str, Any]:
        """Keyword options for pydicom's Decoder/Encoder for a single frame."""
        return {
            "rows": self.rows,
            "columns": self.columns,
            "samples_per_pixel": self.samples_per_pixel,
            "bits_allocated": self.bits_allocated,
            "bits_stored": self.bits_stored,
            "pixel_representation": self.pixel_representation,
            "photometric_interpretation": self.photometric_interpretation,
            "planar_configuration": self.planar_configuration,
            "number_of_frames": 1,
        }
