"""Deflated Explicit VR Little Endian Part 10 files built for the tests, a deflate
bomb among them: a few hundred kilobytes that inflate to hundreds of megabytes."""

from __future__ import annotations

import struct
import zlib

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, DeflatedExplicitVRLittleEndian, generate_uid

from gateway.part10 import file_meta_header

_ZEROS = bytes(1 << 20)


def deflated_instance(zero_bytes: int, sop_instance_uid: str | None = None) -> tuple[bytes, str]:
    """(the file, its SOP Instance UID): a CT's identifying attributes and then an OB
    element of ``zero_bytes`` zeros, the data set deflated as a whole (PS3.5 A.5)."""
    uid = sop_instance_uid or generate_uid()
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = uid
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, False
    write_dataset(encoded, ds)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [deflater.compress(encoded.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, zero_bytes))]
    left = zero_bytes
    while left:
        n = min(left, len(_ZEROS))
        parts.append(deflater.compress(_ZEROS[:n]))
        left -= n
    parts.append(deflater.flush())
    return file_meta_header(CTImageStorage, uid, DeflatedExplicitVRLittleEndian, "BOMB") + b"".join(parts), uid
