"""HTJ2K through imagecodecs (OpenJPH): a pydicom decoder plugin and an encoder.

pydicom decodes HTJ2K only through pylibjpeg-openjpeg; OpenJPH via imagecodecs
measured about twice as fast, and pydicom has no HTJ2K encoder at all. The
decoder is registered as a pydicom plugin so sign correction, colour handling
and multi-frame iteration stay pydicom's.
"""

from __future__ import annotations

import math
from typing import Any

import imagecodecs
import numpy as np
from pydicom.pixels import get_decoder
from pydicom.pixels.common import PhotometricInterpretation as PI
from pydicom.pixels.decoders.base import DecodeRunner

from gateway.codecs.syntaxes import HTJ2K_FAMILY, HTJ2K_LOSSLESS_RPCL

PLUGIN_NAME = "imagecodecs"

# Required by pydicom's plugin protocol (reported when unavailable).
DECODER_DEPENDENCIES = {uid: ("numpy", "imagecodecs>=2024.1.1") for uid in HTJ2K_FAMILY}

# DICOM PS3.5 10.18: RPCL thumbnails need a base resolution of at most 64 px.
_RPCL_BASE_RESOLUTION = 64
_DEFAULT_DECOMPOSITIONS = 5  # OpenJPH's default, kept for the other HTJ2K syntaxes


def is_available(uid: str) -> bool:
    """pydicom plugin protocol: can this plugin decode `uid` here?"""
    return uid in DECODER_DEPENDENCIES and bool(imagecodecs.HTJ2K.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """pydicom plugin protocol: decode one HTJ2K codestream to raw bytes.

    Mirrors pydicom's pylibjpeg plugin contract: the container size follows
    the codestream precision, colour comes back interleaved, and a reversible
    or irreversible colour transform has already been undone (so RGB).
    """
    arr = imagecodecs.htj2k_decode(src, planar=False)
    runner.set_option("bits_allocated", 8 * arr.dtype.itemsize)
    if runner.samples_per_pixel > 1:
        runner.set_option("planar_configuration", 0)
        if runner.photometric_interpretation in (PI.YBR_ICT, PI.YBR_RCT):
            runner.set_option("photometric_interpretation", PI.RGB)
    return arr.tobytes()


def register() -> None:
    """Add the plugin to pydicom's HTJ2K decoders (idempotent, import-time)."""
    if not imagecodecs.HTJ2K.available:
        return
    for uid in sorted(HTJ2K_FAMILY):
        decoder = get_decoder(uid)
        if PLUGIN_NAME not in decoder.available_plugins:
            decoder.add_plugin(PLUGIN_NAME, (__name__, "decode_frame"))


def plugin_attempts(uid: str) -> tuple[str, ...]:
    """``decoding_plugin`` values to try in turn for `uid`.

    imagecodecs first when registered; then "" (every plugin, pylibjpeg
    first), because OpenJPH rejects plain Part 1 codestreams that some
    senders label as HTJ2K and OpenJPEG still decodes.
    """
    if uid in HTJ2K_FAMILY and PLUGIN_NAME in get_decoder(uid).available_plugins:
        return (PLUGIN_NAME, "")
    return ("",)


def encode(arr: np.ndarray, uid: str) -> bytes:
    """Encode one interleaved frame as a reversible (lossless) HTJ2K codestream.

    No colour transform is applied so the Photometric Interpretation (RGB,
    YBR_FULL) stays valid as it is. The codestream precision is the array's
    itemsize: imagecodecs exposes no bit-depth setting, which is why
    encoded descriptions raise Bits Stored to Bits Allocated for HTJ2K.
    For the RPCL syntax, PS3.5 10.18 asks for RPCL order (OpenJPH's default),
    enough decompositions for a <= 64 px base resolution, and TLM markers;
    tile-parts are split per resolution so the markers find each level.
    """
    options: dict[str, Any] = {"reversible": True, "rgb": False}
    if uid == HTJ2K_LOSSLESS_RPCL:
        longest = max(arr.shape[0], arr.shape[1])
        needed = max(0, math.ceil(math.log2(longest / _RPCL_BASE_RESOLUTION)))
        options["resolutions"] = max(_DEFAULT_DECOMPOSITIONS, needed)
        options["tlm"] = True
        options["tilepart"] = imagecodecs.HTJ2K.TILEPART.RESOLUTIONS
    return bytes(imagecodecs.htj2k_encode(np.ascontiguousarray(arr), **options))
