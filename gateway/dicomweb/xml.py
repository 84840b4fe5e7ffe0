"""DICOM JSON (PS3.18 Annex F) to the Native DICOM Model XML of PS3.19 Annex A.1.

QIDO-RS answers in XML are one such document per match, each a part of a
``multipart/related; type="application/dicom+xml"`` body (PS3.18 8.3.4.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree as ET

from pydicom.datadict import keyword_for_tag

_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")


def _person_name(parent: ET.Element, number: int, value: Any) -> None:
    node = ET.SubElement(parent, "PersonName", number=str(number))
    groups = value if isinstance(value, Mapping) else {"Alphabetic": str(value)}
    for group in ("Alphabetic", "Ideographic", "Phonetic"):
        text = groups.get(group)
        if not text:
            continue
        group_node = ET.SubElement(node, group)
        for name, component in zip(_PN_COMPONENTS, str(text).split("^")):
            if component:
                ET.SubElement(group_node, name).text = component


def _attribute(parent: ET.Element, key: str, obj: Mapping[str, Any]) -> None:
    vr = str(obj.get("vr") or "UN")
    attrs = {"tag": key.upper(), "vr": vr}
    try:
        keyword = keyword_for_tag(int(key, 16))
    except ValueError:
        keyword = ""
    if keyword:
        attrs["keyword"] = keyword
    node = ET.SubElement(parent, "DicomAttribute", attrs)
    if "BulkDataURI" in obj:
        ET.SubElement(node, "BulkData", uri=str(obj["BulkDataURI"]))
        return
    if "InlineBinary" in obj:
        ET.SubElement(node, "InlineBinary").text = str(obj["InlineBinary"])
        return
    for number, value in enumerate(obj.get("Value") or [], start=1):
        if vr == "SQ":
            item = ET.SubElement(node, "Item", number=str(number))
            _fill(item, value if isinstance(value, Mapping) else {})
        elif vr == "PN":
            _person_name(node, number, value)
        else:
            value_node = ET.SubElement(node, "Value", number=str(number))
            if value is not None:
                value_node.text = str(value)


def _fill(parent: ET.Element, obj: Mapping[str, Any]) -> None:
    for key in sorted(obj):
        value = obj[key]
        if isinstance(value, Mapping):
            _attribute(parent, key, value)


def native_xml(obj: Mapping[str, Any]) -> bytes:
    """One DICOM JSON object as a PS3.19 NativeDicomModel document (UTF-8)."""
    root = ET.Element("NativeDicomModel", xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM")
    _fill(root, obj)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8", xml_declaration=False)
