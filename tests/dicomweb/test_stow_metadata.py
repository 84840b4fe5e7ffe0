"""Instances built from STOW-RS metadata and bulk data: read back with pydicom, the
bytes of each bulk part where the file says they are, and each refusal's reason; and
PS3.19 XML metadata read into the same DICOM JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from gateway.dicomweb.stow_metadata import (
    CANNOT_UNDERSTAND,
    DATA_SET_MISMATCH,
    SYNTAX_NOT_SUPPORTED,
    BulkPart,
    NotBuilt,
    build_instance,
    metadata_objects,
)
from gateway.dicomweb.xml import json_from_native_xml, native_xml

SC = "1.2.840.10008.5.1.4.1.1.7"
PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"


def _metadata(instance: str = "1.2.3.4.1", **extra: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "00080016": {"vr": "UI", "Value": [SC]},
        "00080018": {"vr": "UI", "Value": [instance]},
        "0020000D": {"vr": "UI", "Value": ["1.2.3.4"]},
        "0020000E": {"vr": "UI", "Value": ["1.2.3.4.0"]},
        "00080060": {"vr": "CS", "Value": ["OT"]},
        "00100020": {"vr": "LO", "Value": ["PID-1"]},
    }
    obj.update(extra)
    return obj


def _read(built: Any) -> pydicom.Dataset:
    out = io.BytesIO()
    out.write(b"\x00" * 128)
    built.write(out.write)
    out.seek(0)
    return pydicom.dcmread(out)


def _jpeg(mode: str = "L", size: tuple[int, int] = (48, 32)) -> tuple[bytes, np.ndarray]:
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    ramp = (x * 5 + y * 2).astype(np.uint8)  # smooth, so JPEG keeps it close
    array = ramp if mode == "L" else np.stack([ramp, (y * 7).astype(np.uint8), 255 - ramp], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, "JPEG", quality=95)
    return buffer.getvalue(), array


def test_a_jpeg_becomes_a_baseline_image_with_its_pixel_attributes_from_its_header() -> None:
    jpeg, array = _jpeg("RGB")
    obj = _metadata(**{"7FE00010": {"vr": "OB", "BulkDataURI": "jpeg-image"}})
    built = build_instance(obj, {"jpeg-image": BulkPart.of("image/jpeg", jpeg, None, len(jpeg))})
    ds = _read(built)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert (ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation) == (32, 48, 3, "YBR_FULL_422")
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation, ds.PlanarConfiguration) == (8, 8, 7, 0, 0)
    fragments = list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    assert fragments[0].rstrip(b"\x00") == jpeg.rstrip(b"\x00")
    decoded = ds.pixel_array  # pydicom converts YBR to RGB
    assert decoded.shape == (32, 48, 3)
    assert np.abs(decoded.astype(int) - array.astype(int)).mean() < 8  # lossy, but the same picture
    assert (ds.PatientID, ds.Modality, ds.file_meta.MediaStorageSOPInstanceUID) == ("PID-1", "OT", "1.2.3.4.1")


def test_native_frames_from_a_spilled_part_and_unicode_text(tmp_path: Path) -> None:
    frames = (np.arange(2 * 16 * 24) * 37 % 4096).astype("<u2").reshape(2, 16, 24)
    path = tmp_path / "pixels.part"
    path.write_bytes(frames.tobytes())
    obj = _metadata(
        **{
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Zoë"}]},
            "00280002": {"vr": "US", "Value": [1]}, "00280004": {"vr": "CS", "Value": ["MONOCHROME2"]},
            "00280008": {"vr": "IS", "Value": [2]}, "00280010": {"vr": "US", "Value": [16]},
            "00280011": {"vr": "US", "Value": [24]}, "00280100": {"vr": "US", "Value": [16]},
            "00280101": {"vr": "US", "Value": [12]}, "00280102": {"vr": "US", "Value": [11]},
            "00280103": {"vr": "US", "Value": [0]},
            "7FE00010": {"vr": "OW", "BulkDataURI": "http://client/pixels"},
        }
    )
    built = build_instance(obj, {"http://client/pixels": BulkPart.of("application/octet-stream", None, path, path.stat().st_size)})
    ds = _read(built)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(ds.pixel_array, frames)
    assert ds.SpecificCharacterSet == "ISO_IR 192" and str(ds.PatientName) == "Müller^Zoë"


def test_a_pdf_becomes_the_encapsulated_document_value() -> None:
    pdf = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"  # odd length: padded
    obj = _metadata(
        **{
            "00080016": {"vr": "UI", "Value": [PDF_CLASS]},
            "00420012": {"vr": "LO", "Value": ["application/pdf"]},
            "00420011": {"vr": "OB", "BulkDataURI": "report.pdf"},
        }
    )
    ds = _read(build_instance(obj, {"report.pdf": BulkPart.of("application/pdf", pdf, None, len(pdf))}))
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.EncapsulatedDocument[: len(pdf)] == pdf and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.SOPClassUID == PDF_CLASS


def test_the_part_or_the_metadata_names_the_syntax() -> None:
    jpeg, _ = _jpeg()
    obj = _metadata(**{"7FE00010": {"vr": "OB", "BulkDataURI": "x"}, "00280010": {"vr": "US", "Value": [32]}})
    part = BulkPart.of("image/jpeg; transfer-syntax=1.2.840.10008.1.2.4.70", jpeg, None, len(jpeg))
    assert build_instance(obj, {"x": part}).transfer_syntax == "1.2.840.10008.1.2.4.70"
    obj["00020010"] = {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.51"]}
    assert build_instance(obj, {"x": BulkPart.of("image/jpeg", jpeg, None, len(jpeg))}).transfer_syntax == "1.2.840.10008.1.2.4.51"


@pytest.mark.parametrize(
    ("change", "parts", "reason", "words"),
    [
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "missing"}}, {}, CANNOT_UNDERSTAND, "Content-Location"),
        ({"00080018": {"vr": "UI", "Value": ["not a uid"]}}, {}, DATA_SET_MISMATCH, "SOPInstanceUID"),
        ({"PatientName": {"vr": "PN", "Value": [{"Alphabetic": "A^B"}]}}, {}, CANNOT_UNDERSTAND, "not a tag"),
        ({"00091010": {"vr": "XX", "Value": [1]}}, {}, CANNOT_UNDERSTAND, "cannot be encoded: NotImplementedError at (0009,1010)"),
        # a VR PS3.6 does not give the attribute: the file would break its readers
        ({"00280100": {"vr": "PN", "Value": ["1.2.3"]}}, {}, CANNOT_UNDERSTAND, "gives BitsAllocated the VR PN; PS3.6 defines US"),
        ({"00081199": {"vr": "SQ", "Value": [{"00081150": {"vr": "AS", "Value": ["x"]}}]}}, {}, CANNOT_UNDERSTAND,
         "gives ReferencedSOPClassUID the VR AS"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "png"}}, {"png": ("image/png", b"\x89PNG")}, SYNTAX_NOT_SUPPORTED, "image/png"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "j"}, "00020010": {"vr": "UI", "Value": ["1.2.840.10008.1.2.4.90"]}},
         {"j": ("image/jpeg", b"")}, SYNTAX_NOT_SUPPORTED, "cannot hold"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "j"}}, {"j": ("image/jpeg", b"not a jpeg")}, CANNOT_UNDERSTAND, "not a JPEG"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "j"}, "00280010": {"vr": "US", "Value": [99]}},
         {"j": ("image/jpeg", None)}, DATA_SET_MISMATCH, "Rows 99 but the JPEG has 32"),
        ({"7FE00010": {"vr": "OW", "BulkDataURI": "n"}, "00280010": {"vr": "US", "Value": [4]}, "00280011": {"vr": "US", "Value": [4]},
          "00280002": {"vr": "US", "Value": [1]}, "00280100": {"vr": "US", "Value": [16]}},
         {"n": ("application/octet-stream", b"\x00" * 30)}, DATA_SET_MISMATCH, "30 bytes where the image needs 32"),
        ({"7FE00010": {"vr": "OW", "BulkDataURI": "n"}}, {"n": ("application/octet-stream", b"\x00" * 32)}, DATA_SET_MISMATCH, "without Rows"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "k"}, "00280008": {"vr": "IS", "Value": [3]}},
         {"k": ("image/jp2", b"\x00" * 8)}, SYNTAX_NOT_SUPPORTED, "multi-frame"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "j"}, "00280008": {"vr": "IS", "Value": [2]}},
         {"j": ("image/jpeg", None)}, SYNTAX_NOT_SUPPORTED, "multi-frame"),
        ({"7FE00010": {"vr": "OB", "BulkDataURI": "j"}, "00280008": {"vr": "IS", "Value": ["two"]}},
         {"j": ("image/jpeg", None)}, CANNOT_UNDERSTAND, "not valid DICOM JSON"),
    ],
)
def test_what_cannot_be_built_fails_with_its_reason(change: dict[str, Any], parts: dict[str, tuple[str, bytes | None]], reason: int, words: str) -> None:
    jpeg, _ = _jpeg()
    bulk = {uri: BulkPart.of(kind, jpeg if data is None else data, None, len(jpeg if data is None else data)) for uri, (kind, data) in parts.items()}
    with pytest.raises(NotBuilt) as caught:
        build_instance(_metadata(**change), bulk)
    assert caught.value.reason == reason and words in str(caught.value)


def test_metadata_parts_hold_an_array_or_one_object() -> None:
    assert len(metadata_objects(json.dumps([_metadata("1.1"), _metadata("1.2")]).encode())) == 2
    assert len(metadata_objects(json.dumps(_metadata()).encode())) == 1
    for bad in (b"[]", b"[1, 2]", b"{not json", b'"text"'):
        with pytest.raises(ValueError):
            metadata_objects(bad)


def test_ps319_metadata_reads_back_into_the_json_it_was_written_from() -> None:
    obj = _metadata(
        **{
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Müller^Zoë^^Dr", "Ideographic": "ミュラー"}]},
            "00280010": {"vr": "US", "Value": [32]},
            "00281050": {"vr": "DS", "Value": [40.5, -20.0]},
            "00081115": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.9"]}}, {}]},
            "00200020": {"vr": "CS", "Value": ["A", None]},
            "00189004": {"vr": "CS"},
            "7FE00010": {"vr": "OB", "BulkDataURI": "http://client/pixels?x=1&y=2"},
            "00091010": {"vr": "OB", "InlineBinary": "AAEC"},
        }
    )
    assert json_from_native_xml(native_xml(obj)) == obj
    jpeg, _ = _jpeg()
    built = build_instance(json_from_native_xml(native_xml(obj)), {"http://client/pixels?x=1&y=2": BulkPart.of("image/jpeg", jpeg, None, len(jpeg))})
    assert _read(built).PatientName.components[0] == "Müller^Zoë^^Dr"


@pytest.mark.parametrize(
    "document",
    [
        b"<not xml",
        b"<Other/>",
        b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><NativeDicomModel>&a;</NativeDicomModel>',
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "aaaa">]><NativeDicomModel>&a;</NativeDicomModel>'.encode("utf-16"),
        '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE x [<!ENTITY a "a">]><NativeDicomModel/>'.encode("utf-16-le"),
        b"<NativeDicomModel>\xff</NativeDicomModel>",
        b'<NativeDicomModel><DicomAttribute tag="zz" vr="CS"/></NativeDicomModel>',
        b'<NativeDicomModel><DicomAttribute tag="00280010" vr="US"><Value number="1">many</Value></DicomAttribute></NativeDicomModel>',
    ],
)
def test_documents_that_are_not_native_dicom_models_are_refused(document: bytes) -> None:
    with pytest.raises(ValueError):
        json_from_native_xml(document)


def test_metadata_nested_past_any_reason_is_refused_not_crashed() -> None:
    depth = 5000
    deep_json = '{"00081115": {"vr": "SQ", "Value": [' * depth + "{}" + "]}}" * depth
    with pytest.raises(ValueError):
        metadata_objects(deep_json.encode())
    item = '<DicomAttribute tag="00081115" vr="SQ"><Item number="1">'
    deep_xml = "<NativeDicomModel>" + item * depth + "</Item></DicomAttribute>" * depth + "</NativeDicomModel>"
    with pytest.raises(ValueError):
        json_from_native_xml(deep_xml.encode())
    shallow_enough = {"00081115": {"vr": "SQ", "Value": [{}]}}
    for _ in range(900):  # deep for DICOM, within what Python's recursion takes
        shallow_enough = {"00081115": {"vr": "SQ", "Value": [shallow_enough]}}
    with pytest.raises(NotBuilt) as caught:
        build_instance(_metadata(**shallow_enough), {})
    assert caught.value.reason == CANNOT_UNDERSTAND
