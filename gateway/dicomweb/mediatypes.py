"""Media types of PS3.18 used on the wire, in one place."""

from __future__ import annotations

import re

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


# PS3.18 Table 8.7.3-5: the media type a frame of each compressed transfer syntax is
# sent as; native (uncompressed) frames are application/octet-stream.
_FRAME_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx",
    "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}
# Every media type a compressed frame can travel as, each once.
FRAME_MEDIA_TYPES = tuple(dict.fromkeys(_FRAME_MEDIA_TYPES.values()))
_TRANSFER_SYNTAX_PARAM = re.compile(r"""(?:^|[;\s"'])transfer-syntax\s*=\s*"?([0-9.]+)""", re.IGNORECASE)


def frame_syntaxes(media: str) -> tuple[str, ...]:
    """The compressed transfer syntaxes frames of ``media`` travel in (the inverse of
    `frame_media_type`), the commonest first; () for a media type of none."""
    return tuple(syntax for syntax, kind in _FRAME_MEDIA_TYPES.items() if kind == media)


def frame_media_type(transfer_syntax: str) -> str:
    """The media type frames in ``transfer_syntax`` travel as (``*``: octet-stream)."""
    return _FRAME_MEDIA_TYPES.get(transfer_syntax, OCTET_STREAM)


def transfer_syntax_param(content_type: str) -> str | None:
    """The ``transfer-syntax`` parameter of a Content-Type, also where Orthanc puts it
    (inside the quoted ``type`` parameter of a multipart answer); None when absent or
    ``*``."""
    match = _TRANSFER_SYNTAX_PARAM.search(content_type)
    return match.group(1) if match else None


def media_type(content_type: str) -> str:
    """The bare media type of a Content-Type value, lower case."""
    return content_type.split(";", 1)[0].strip().lower()
