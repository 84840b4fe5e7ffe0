"""DICOM JSON (PS3.18 F.2) of a plain data element straight from its encoded bytes.

Why: the embedded archive builds every stored instance's metadata from its header,
and pydicom's way (convert the raw element, then ``DataElement.to_json_dict``) costs
50-80 us per element on this project's machine: about 1.7 ms of the writer's 2.7 ms
for the bench's 22-element CT, about 14 ms for a scanner's 256 elements. The writer
shares the two cores with the receiving associations, so that time is taken from
ingest too.

`element_json` answers only where its answer is provably pydicom's: little-endian
values held in memory, numbers and binary values of any length that fits their VR,
and strings that are ASCII without escape sequences (the same characters under every
character set pydicom decodes), whose numbers are written as their VR defines and
which have no empty value among several. Everything else (sequences, person names,
AT, UN, ambiguous or private implicit VRs, the LUT descriptors pydicom mends, values
read later, anything unusual in a value) returns None and takes pydicom's way, which
stays the reference: a test holds the two to the same JSON on pydicom's whole corpus.
"""

from __future__ import annotations

import base64
import re
import struct
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement

# Numeric VRs and their little-endian struct codes (pydicom's own).
_NUMBERS = {"US": "H", "SS": "h", "UL": "I", "SL": "i", "FL": "f", "FD": "d", "SV": "q", "UV": "Q"}
_SIZES = {vr: struct.calcsize("<" + code) for vr, code in _NUMBERS.items()}
# Binary VRs sent whole as InlineBinary (the archive's metadata has no bulk data URIs).
_BINARY = frozenset({"OB", "OW", "OF", "OD", "OL", "OV"})
# String VRs by how pydicom cuts their values:
# the whole value stripped of trailing spaces and NULs, then split at backslashes;
_WHOLE_STRIPPED = frozenset({"AS", "CS", "DA", "DT", "TM", "UI"})
# split at backslashes, each value stripped of trailing NULs and spaces;
_EACH_STRIPPED = frozenset({"SH", "LO", "UC"})
# one value (backslashes are text), stripped of trailing NULs and spaces.
_SINGLE = frozenset({"ST", "LT", "UT"})
# The LUT descriptors, whose first value pydicom reads as unsigned whatever the VR.
_LUT_DESCRIPTORS = frozenset({0x00281101, 0x00281102, 0x00281103, 0x00283002})
# Integer and decimal strings as PS3.5 defines them (no spaces: a padded value takes
# pydicom's way); IS at most 12 characters, DS at most 16.
_IS = re.compile(r"[+-]?[0-9]{1,11}")
_DS = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
_UNDEFINED = 0xFFFFFFFF


def element_json(raw: RawDataElement) -> dict[str, Any] | None:
    """``raw`` (an element as ``Dataset.elements()`` yields it, in a sequence item
    too: only text that reads the same under any character set is answered, so the
    item's inherited one does not matter) as DICOM JSON with binary values inline,
    exactly as pydicom would give it; None where pydicom's way must be taken."""
    value = raw.value
    if not isinstance(value, bytes) or not raw.is_little_endian or raw.length == _UNDEFINED:
        return None
    vr = raw.VR
    if vr is None:
        if raw.tag.is_private:
            return None
        try:
            vr = dictionary_VR(raw.tag)
        except KeyError:
            return None
    if not value:
        return {"vr": vr} if vr in _NUMBERS or vr in _BINARY or vr in _STRINGS else None
    if vr in _NUMBERS:
        size = _SIZES[vr]
        if len(value) % size or raw.tag in _LUT_DESCRIPTORS:
            return None
        return {"vr": vr, "Value": list(struct.unpack(f"<{len(value) // size}{_NUMBERS[vr]}", value))}
    if vr in _BINARY:
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr not in _STRINGS or not value.isascii() or b"\x1b" in value:
        return None
    values = _strings(vr, value.decode("ascii"))
    if values is None:
        return None
    return {"vr": vr, "Value": values} if values else {"vr": vr}


def _strings(vr: str, text: str) -> list[Any] | None:
    """The values of a string element as pydicom converts them (an empty list for an
    empty value), IS and DS as numbers; None where that is not plain."""
    if vr in _WHOLE_STRIPPED:
        parts = text.rstrip(" \x00").split("\\")
    elif vr in _EACH_STRIPPED:
        parts = [part.rstrip("\x00 ") for part in text.split("\\")]
    elif vr in _SINGLE:
        parts = [text.rstrip("\x00 ")]
    elif vr == "UR":
        parts = [text.rstrip()]
    elif vr == "AE":
        parts = [part.strip() for part in text.split("\\")]
    elif vr == "IS":
        parts = text.rstrip(" \x00").split("\\")
        if not all(_IS.fullmatch(part) for part in parts):
            return None
        return [int(part) for part in parts]
    else:  # DS
        parts = text.strip().rstrip(" \x00").split("\\")
        if not all(len(part) <= 16 and _DS.fullmatch(part) for part in parts):
            return None
        return [float(part) for part in parts]
    if len(parts) == 1:
        return parts if parts[0] else []
    return None if "" in parts else parts


_STRINGS = _WHOLE_STRIPPED | _EACH_STRIPPED | _SINGLE | {"UR", "AE", "IS", "DS"}
