"""JPEG baseline (process 1) encoding through imagecodecs (libjpeg-turbo).

The only lossy encoder: it exists for peers that accept nothing but JPEG
baseline, and is used only when the caller allows lossy conversion.
"""

from __future__ import annotations

import imagecodecs
import numpy as np

QUALITY = 90


def encode_baseline(arr: np.ndarray, photometric_interpretation: str) -> bytes:
    """Encode an 8-bit frame; colour is written as YCbCr 4:2:2 (YBR_FULL_422).

    RGB input is converted to YCbCr by libjpeg; YBR_FULL input already is
    YCbCr, so only the chroma subsampling is applied.
    """
    if arr.ndim == 2:
        return bytes(imagecodecs.jpeg8_encode(arr, level=QUALITY))
    source_space = "RGB" if photometric_interpretation == "RGB" else "YCBCR"
    return bytes(
        imagecodecs.jpeg8_encode(
            np.ascontiguousarray(arr),
            level=QUALITY,
            colorspace=source_space,
            outcolorspace="YCBCR",
            subsampling="422",
        )
    )
