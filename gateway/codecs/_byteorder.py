"""Byte swapping for conversions between little and big endian native syntaxes.

pydicom re-encodes numeric values itself but writes OB/OW/OF/OL/OD/OV bytes
as they are (see the warning on ``pydicom.filewriter.dcmwrite``), so those
have to be swapped here. UN values are left alone: their internal layout is
unknown.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.tag import Tag

from gateway.codecs.errors import TranscodeError

_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}
_PIXEL_DATA = Tag(0x7FE0, 0x0010)


def swap_dataset(ds: Dataset, *, source_little_endian: bool) -> None:
    """Swap, in place, every multi-byte binary value in `ds` and its sequences."""
    correct_ambiguous_vr(ds, is_little_endian=source_little_endian)
    _swap(ds)


def _swap(ds: Dataset) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _swap(item)
        elif not elem.value:
            continue
        elif elem.tag == _PIXEL_DATA:
            size = _pixel_cell_size(ds, elem.VR)
            if size > 1:
                elem.value = _swapped(elem.value, size, "Pixel Data")
        elif elem.VR in _WORD_SIZE:
            elem.value = _swapped(elem.value, _WORD_SIZE[elem.VR], elem.keyword or str(elem.tag))


def _pixel_cell_size(ds: Dataset, vr: str) -> int:
    """Bytes per swapped unit of native Pixel Data, as pydicom reads big endian.

    Samples wider than 8 bits are swapped per sample; 8-bit samples only when
    the value is OW (then as 16-bit words); 1-bit data is a plain byte stream.
    """
    bits = int(ds.get("BitsAllocated") or 8)
    if bits > 8:
        return bits // 8
    return 2 if bits == 8 and vr == "OW" else 1


def _swapped(value: bytes, size: int, name: str) -> bytes:
    if len(value) % size:
        raise TranscodeError(
            f"{name} has {len(value)} bytes, not a whole number of {size}-byte words"
        )
    return np.frombuffer(value, dtype=f"u{size}").byteswap().tobytes()
