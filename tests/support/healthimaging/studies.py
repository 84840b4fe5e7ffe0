"""Many small studies, fast: one instance each without pixel data, for searches that
must page past the service's limits (loaded with `Emulator.load`)."""

from __future__ import annotations

import io
from collections.abc import Iterator

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

ROOT = "1.2.826.0.1.3680043.10.1147"


def tiny_studies(count: int, run: int, patient_prefix: str = "BULK", modality: str = "OT") -> Iterator[bytes]:
    """``count`` Part 10 files, each its own study; ``run`` keeps UIDs apart between calls.
    Patient IDs are ``{patient_prefix}{n:05d}``, names ``Bulk^{n:05d}``."""
    for n in range(count):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.{run}.{n}.3"
        ds.StudyInstanceUID = f"{ROOT}.{run}.{n}.1"
        ds.SeriesInstanceUID = f"{ROOT}.{run}.{n}.2"
        ds.PatientName = f"Bulk^{n:05d}"
        ds.PatientID = f"{patient_prefix}{n:05d}"
        ds.StudyDate = "20240101"
        ds.Modality = modality
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        yield buffer.getvalue()
