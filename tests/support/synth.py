"""Synthetic CT series for load, kill and benchmark scenarios.

Generated, not shipped: 200 slices of 512 KB would bloat the repository, and each run
gets fresh UIDs so archives never see a duplicate from an earlier run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def ct_series(
    directory: Path,
    count: int,
    rows: int = 512,
    columns: int = 512,
    study_uid: str | None = None,
    frames: int = 1,
    scanner_header: bool = False,
) -> list[Path]:
    """Write ``count`` 16-bit CT instances of one series; return their paths in order.

    Each carries the 23 elements an archive needs; with ``scanner_header`` also the rest
    of pydicom's ``CT_small.dcm`` (258 elements in all: equipment, acquisition,
    private groups), as a scanner writes them. Whatever the gateway does per element
    (its header check, the embedded archive's DICOM JSON) costs ten times as much.
    """
    directory.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    yy, xx = np.mgrid[0:rows, 0:columns]
    base = (1000 + 800 * np.exp(-((xx - columns / 2) ** 2 + (yy - rows / 2) ** 2) / (rows * columns / 8)))
    rng = np.random.default_rng(7)
    paths = []
    template = dcmread(get_testdata_file("CT_small.dcm")) if scanner_header else None
    for n in range(count):
        ds = copy.deepcopy(template) if template is not None else Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.PatientName = "Synthetic^Load"
        ds.PatientID = "SYNTH-001"
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.Modality = "CT"
        ds.SeriesNumber = 1
        ds.InstanceNumber = n + 1
        ds.ImagePositionPatient = [0, 0, n]
        ds.Rows = rows
        ds.Columns = columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        if frames > 1:
            ds.NumberOfFrames = frames
        noise = rng.integers(0, 40, size=(rows, columns), dtype=np.uint16)
        frame = (base + noise).astype(np.uint16) & 0x0FFF
        ds.PixelData = np.tile(frame, (frames, 1, 1)).tobytes() if frames > 1 else frame.tobytes()
        path = directory / f"ct{n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
