"""Codec layer: transfer syntax choice, dataset transcoding, frame codecs, rendering.

Pure functions over datasets, bytes and arrays; no network or file I/O.
Importing the package registers the imagecodecs HTJ2K decoder with pydicom.
"""

from gateway.codecs import _htj2k
from gateway.codecs.choose import choose_for_dataset, choose_transfer_syntax
from gateway.codecs.description import PixelDescription
from gateway.codecs.errors import TranscodeError
from gateway.codecs.frames import (
    decode_frame,
    decode_frame_described,
    encode_frame,
    encode_problem,
    encoded_description,
)
from gateway.codecs.render import render_frame, window_from_dataset
from gateway.codecs.syntaxes import SYNTAXES, Fidelity, SyntaxInfo, syntax_info
from gateway.codecs.convert import transcode

_htj2k.register()

__all__ = [
    "SYNTAXES",
    "Fidelity",
    "PixelDescription",
    "SyntaxInfo",
    "TranscodeError",
    "choose_for_dataset",
    "choose_transfer_syntax",
    "decode_frame",
    "decode_frame_described",
    "encode_frame",
    "encode_problem",
    "encoded_description",
    "render_frame",
    "syntax_info",
    "transcode",
    "window_from_dataset",
]
