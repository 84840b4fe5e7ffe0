"""The Modality LUT and VOI stages of rendering (PS3.3 C.11.1, C.11.2): the three VOI
LUT Functions, a VOI LUT Sequence item and a Modality LUT Sequence item, against the
standard's formulas written out in numpy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from gateway.codecs.description import PixelDescription
from gateway.codecs.render import (
    ModalityLut,
    Rescale,
    VoiLut,
    VoiWindow,
    render_frame,
    rescale_from_dataset,
    voi_from_dataset,
)

DESC = PixelDescription(16, 16, 1, 16, 12, 0, "MONOCHROME2")
ARR = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 16) % 4096
RESCALE = Rescale(2.0, -1000.0)


def _png(voi: VoiWindow | VoiLut, desc: PixelDescription = DESC) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(render_frame(ARR, desc, "png", voi=voi, rescale=RESCALE))))


def _eight(y: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(y * 255.0), 0, 255).astype(np.uint8)


def test_linear_exact_and_sigmoid_follow_the_standard() -> None:
    x = ARR.astype(np.float64) * 2.0 - 1000.0
    c, w = 1500.0, 3000.0
    exact = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 1.0, (x - c) / w + 0.5))
    assert np.array_equal(_png(VoiWindow(c, w, "LINEAR_EXACT")), _eight(exact))
    sigmoid = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    assert np.array_equal(_png(VoiWindow(c, w, "SIGMOID")), _eight(sigmoid))
    linear = np.where(x <= c - 0.5 - (w - 1) / 2, 0.0, np.where(x > c - 0.5 + (w - 1) / 2, 1.0, (x - (c - 0.5)) / (w - 1) + 0.5))
    assert np.array_equal(_png(VoiWindow(c, w)), _eight(linear))
    # LINEAR_EXACT takes widths below 1, LINEAR does not; no function takes 0
    VoiWindow(c, 0.5, "LINEAR_EXACT")
    with pytest.raises(ValueError, match="width"):
        VoiWindow(c, 0.5)
    with pytest.raises(ValueError, match="width"):
        VoiWindow(c, 0, "SIGMOID")
    with pytest.raises(ValueError, match="VOI LUT Function"):
        VoiWindow(c, w, "CUBIC")


def test_voi_lut_sequence_maps_modality_values_through_its_table() -> None:
    x = ARR.astype(np.float64) * 2.0 - 1000.0
    first, bits = -500, 10
    table = (np.sqrt(np.arange(4000)) * (1023 / np.sqrt(3999))).astype(np.uint16)
    expected = table[np.clip(np.rint(x) - first, 0, len(table) - 1).astype(int)] / 1023.0
    item = Dataset()
    item.LUTDescriptor = [len(table), first & 0xFFFF, bits]  # US-encoded: signed for signed pixels only
    item.LUTData = table.tolist()
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.VOILUTSequence = [item]
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the LUT is preferred to the window
    voi = voi_from_dataset(ds)
    assert isinstance(voi, VoiLut) and voi.first == first
    assert np.array_equal(_png(voi), _eight(expected))
    inverted = _png(voi, PixelDescription(16, 16, 1, 16, 12, 0, "MONOCHROME1"))
    assert np.array_equal(inverted, 255 - _eight(expected))


def test_the_instance_window_carries_its_function() -> None:
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = [40, 400], [400, 2000], "SIGMOID"
    assert voi_from_dataset(ds) == VoiWindow(40.0, 400.0, "SIGMOID")
    del ds.VOILUTFunction
    assert voi_from_dataset(ds) == VoiWindow(40.0, 400.0, "LINEAR")
    assert voi_from_dataset(Dataset()) is None


def test_a_modality_lut_sequence_replaces_the_rescale() -> None:
    table = (np.arange(4096) ** 2 // 4096).astype(np.int64)  # a curve no rescale can express
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = table.tolist()
    ds = Dataset()
    ds.ModalityLUTSequence = [item]
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000  # ignored: the table wins
    modality = rescale_from_dataset(ds)
    assert isinstance(modality, ModalityLut)
    x = table[ARR].astype(np.float64)
    window = VoiWindow(2000, 4000, "LINEAR_EXACT")
    out = np.asarray(Image.open(io.BytesIO(render_frame(ARR, DESC, "png", voi=window, rescale=modality))))
    assert np.array_equal(out, _eight(np.where(x <= 0, 0.0, np.where(x > 4000, 1.0, (x - 2000) / 4000 + 0.5))))
    del ds.ModalityLUTSequence
    assert rescale_from_dataset(ds) == Rescale(2.0, -1000.0)
