"""Many small studies, fast: one instance each without pixel data, for searches that
must page past the service's limits (loaded with `Emulator.load`)."""

from __future__ import annotations

import io
from collections.abc import Iterator

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

ROOT = "1.2.826.0.1.3680043.10.1147"
# Stand-ins written once by pydicom, then replaced by each study's values of the same
# width: encoding 10,000 data sets one by one took half of the longest test.
_NUMBER = b"987654"  # a UID component: 100000 + n, no leading zero (PS3.5 9.1)
_DIGITS = b"ZZZZZ"  # n, five digits, in the patient's name and ID


def _template(run: int, patient_prefix: str, modality: str) -> bytes:
    number, digits = _NUMBER.decode(), _DIGITS.decode()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.{run}.{number}.3"
    ds.StudyInstanceUID = f"{ROOT}.{run}.{number}.1"
    ds.SeriesInstanceUID = f"{ROOT}.{run}.{number}.2"
    ds.PatientName = f"Bulk^{digits}"
    ds.PatientID = f"{patient_prefix}{digits}"
    ds.StudyDate = "20240101"
    ds.Modality = modality
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    raw = buffer.getvalue()
    assert raw.count(_NUMBER) == 4 and raw.count(_DIGITS) == 2, "a stand-in value occurs elsewhere in the file"
    return raw


def tiny_studies(count: int, run: int, patient_prefix: str = "BULK", modality: str = "OT") -> Iterator[bytes]:
    """``count`` Part 10 files, each its own study; ``run`` keeps UIDs apart between calls.
    Patient IDs are ``{patient_prefix}{n:05d}``, names ``Bulk^{n:05d}``."""
    if count > 100_000:
        raise ValueError("at most 100,000 studies: their numbers have five digits")
    template = _template(run, patient_prefix, modality)
    for n in range(count):
        yield template.replace(_NUMBER, b"%d" % (100_000 + n)).replace(_DIGITS, b"%05d" % n)
