"""Media types of PS3.18 used on the wire, in one place."""

from __future__ import annotations

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
DICOM_XML = "application/dicom+xml"
JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
MULTIPART_RELATED = "multipart/related"


def multipart_related(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """A ``multipart/related`` Content-Type with DICOMweb's ``type=`` parameter."""
    value = f'{MULTIPART_RELATED}; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


def multipart_accept(part_type: str, transfer_syntax: str | None = None) -> str:
    """An Accept value asking for ``multipart/related`` parts of ``part_type``."""
    value = f'{MULTIPART_RELATED}; type="{part_type}"'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value
