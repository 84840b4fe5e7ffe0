"""Helpers for the codec tests: pydicom's bundled files and synthetic datasets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid

from gateway.codecs.syntaxes import EXPLICIT_VR_LE

# Image Pixel and lossy-compression attributes a conversion may rewrite;
# everything else must survive byte for byte.
PIXEL_KEYWORDS = {
    "PixelData",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsStored",
    "HighBit",
    "NumberOfFrames",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "ExtendedOffsetTable",
    "ExtendedOffsetTableLengths",
}


def bundled(name: str) -> Dataset:
    """A file shipped inside the pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not bundled")
    return dcmread(path)


def reread(ds: Dataset) -> Dataset:
    """Encode `ds` in its file_meta transfer syntax and parse it back."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def non_pixel_values(ds: Dataset) -> dict[int, object]:
    return {int(elem.tag): elem.value for elem in ds if elem.keyword not in PIXEL_KEYWORDS}


def make_dataset(
    frames: np.ndarray,
    *,
    photometric: str,
    bits_stored: int | None = None,
    transfer_syntax: UID = EXPLICIT_VR_LE,
) -> Dataset:
    """A Secondary Capture dataset holding `frames` (frames, rows, cols[, samples])."""
    count, rows, columns = frames.shape[:3]
    samples = frames.shape[3] if frames.ndim == 4 else 1
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Codec^Test"
    ds.PatientID = "CODEC-1"
    ds.Modality = "OT"
    ds.ImageComments = "synthetic"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = frames.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if frames.dtype.kind == "i" else 0
    if count > 1:
        ds.NumberOfFrames = count
    data = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    return ds


def gradient_frames(
    count: int, rows: int, columns: int, dtype: str, *, samples: int = 1, bits: int | None = None
) -> np.ndarray:
    """Smooth ramps plus deterministic noise, covering the full signed/unsigned range."""
    kind = np.dtype(dtype)
    bits = bits or kind.itemsize * 8
    low = -(2 ** (bits - 1)) if kind.kind == "i" else 0
    high = 2 ** (bits - 1) - 1 if kind.kind == "i" else 2**bits - 1
    rng = np.random.default_rng(7)
    shape = (count, rows, columns) + ((samples,) if samples > 1 else ())
    ramp = np.linspace(0.0, 1.0, rows * columns).reshape(rows, columns)
    ramp = ramp[None, ..., None] if samples > 1 else ramp[None]
    values = low + (high - low) * ramp + rng.normal(0, (high - low) / 50, shape)
    values.flat[0], values.flat[-1] = low, high
    return np.clip(np.rint(values), low, high).astype(kind)
