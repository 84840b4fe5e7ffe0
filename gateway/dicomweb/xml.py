"""DICOM JSON (PS3.18 Annex F) to the Native DICOM Model XML of PS3.19 Annex A.1, and back.

QIDO-RS answers in XML are one such document per match, each a part of a
``multipart/related; type="application/dicom+xml"`` body (PS3.18 8.3.4.4). STOW-RS
metadata may come the other way, one document per instance (PS3.18 10.5.1.2); it is
read into DICOM JSON, so one builder makes instances of both.
"""

from __future__ import annotations

import re
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


# -- and back: a PS3.19 document sent as STOW-RS metadata ---------------------------

_INTEGER_VRS = frozenset({"IS", "SL", "SS", "SV", "UL", "US", "UV"})
_FLOAT_VRS = frozenset({"DS", "FD", "FL"})
_TAG_RE = re.compile(r"^[0-9A-F]{8}$")


def _local(tag: str) -> str:
    """An element's name without its namespace (senders use PS3.19's, or none)."""
    return tag.rsplit("}", 1)[-1]


def _numbered(node: ET.Element, name: str) -> list[ET.Element]:
    children = [child for child in node if _local(child.tag) == name]
    return sorted(children, key=lambda child: int(child.get("number") or 0))


def _value(vr: str, text: str | None) -> Any:
    if text is None or not text.strip():
        return None
    if vr in _INTEGER_VRS:
        return int(text.strip())
    if vr in _FLOAT_VRS:
        return float(text.strip())
    return text


def _person_name_json(node: ET.Element) -> dict[str, str]:
    out = {}
    for group in node:
        components = {_local(c.tag): c.text or "" for c in group}
        out[_local(group.tag)] = "^".join(components.get(name, "") for name in _PN_COMPONENTS).rstrip("^")
    return out


def _object(node: ET.Element) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attribute in node:
        if _local(attribute.tag) != "DicomAttribute":
            continue
        tag = (attribute.get("tag") or "").upper()
        if not _TAG_RE.match(tag):
            raise ValueError(f"DicomAttribute with tag {tag[:16]!r}")
        vr = attribute.get("vr") or "UN"
        element: dict[str, Any] = {"vr": vr}
        bulk = _numbered(attribute, "BulkData")
        inline = _numbered(attribute, "InlineBinary")
        if bulk:
            element["BulkDataURI"] = bulk[0].get("uri") or bulk[0].get("uuid") or ""
        elif inline:
            element["InlineBinary"] = "".join((inline[0].text or "").split())
        elif vr == "SQ":
            element["Value"] = [_object(item) for item in _numbered(attribute, "Item")]
        elif vr == "PN":
            element["Value"] = [_person_name_json(name) for name in _numbered(attribute, "PersonName")]
        else:
            element["Value"] = [_value(vr, value.text) for value in _numbered(attribute, "Value")]
        if element.get("Value") == []:
            del element["Value"]
        out[tag] = element
    return out


def json_from_native_xml(data: bytes) -> dict[str, Any]:
    """A PS3.19 NativeDicomModel document as a DICOM JSON object. Raises ValueError
    for anything else. Only UTF-8 is read (so the search below sees the text as the
    parser will: a UTF-16 document would hide it), and a document type declaration
    is refused outright (entity expansion is how a small request exhausts a parser's
    memory)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError("the document is not UTF-8") from exc
    if "\x00" in text:
        raise ValueError("the document holds NUL characters (UTF-16?), which XML does not allow")
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise ValueError("a document type declaration is not accepted")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise ValueError(f"not XML: {exc}") from exc
    if _local(root.tag) != "NativeDicomModel":
        raise ValueError(f"the root element is {_local(root.tag)[:40]}, not NativeDicomModel")
    try:
        return _object(root)
    except RecursionError as exc:
        raise ValueError("the document's items are nested too deeply") from exc
