"""DICOM JSON (PS3.18 Annex F) to pydicom elements, and the character set of answers.

Search results arrive as DICOM JSON: Unicode text, PN as ``{"Alphabetic",
"Ideographic", "Phonetic"}`` groups, numbers as JSON numbers, sequences as lists of
objects. A C-FIND answer needs only the keys the SCU asked for, so conversion is
per element (``element_from_json``) rather than whole-object: ``Dataset.from_json``
on a full QIDO result costs about 0.2 ms, which a 1000-match answer would pay in full
while returning only a handful of keys.

Text stays Unicode inside the gateway; bytes are produced only when the answer is
encoded, in the character set ``answer_charset`` picked for that answer.
"""

from __future__ import annotations

import base64
import math
import string
from collections.abc import Iterable, Mapping
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import Tag

JsonObject = Mapping[str, Any]

TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
# VRs whose values may hold characters outside the default repertoire (PS3.5 6.1.2.3).
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
NUMBER_VRS = frozenset({"AT", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
KNOWN_VRS = TEXT_VRS | NUMBER_VRS | frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
UTF8 = "ISO_IR 192"
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")


def tag_key(tag: int) -> str:
    """The DICOM JSON attribute name of a tag: eight upper-case hex digits."""
    return f"{tag:08X}"


def first_text(obj: JsonObject, tag: int) -> str:
    """The first value of attribute ``tag`` of a DICOM JSON object, as text ("" when it
    is absent, empty or null): what a search answer's UIDs and counts are read with."""
    values = (obj.get(tag_key(tag)) or {}).get("Value") or [""]
    return "" if values[0] is None else str(values[0])


def keyword_vr(tag: int) -> str:
    """The dictionary VR of a tag (the first of ambiguous ones), ``UN`` if unknown."""
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def pn_from_json(value: Any) -> str:
    """A PN value of DICOM JSON as DICOM text: the groups joined with ``=``."""
    if isinstance(value, str):  # tolerated: some servers send PN as a plain string
        return value
    if not isinstance(value, Mapping):
        return ""
    groups = [str(value.get(g) or "") for g in PN_GROUPS]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups)


def _scalar(vr: str, value: Any) -> Any:
    if value is None:
        return None
    if vr == "PN":
        return pn_from_json(value)
    if vr == "AT":
        return Tag(str(value))
    if vr == "IS" and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _fits(vr: str, value: Any) -> bool:
    """Whether a JSON value can be a value of ``vr`` (PS3.18 F.2.3): text as strings,
    PN as a string or name groups, IS and DS as finite numbers or number strings (IS
    whole, within 32 bits), the binary number VRs as finite numbers, AT as 8 hex digits."""
    if isinstance(value, bool):
        return False
    if vr == "PN":
        return isinstance(value, (str, Mapping))
    if vr in ("IS", "DS"):
        if not isinstance(value, (int, float, str)):
            return False
        try:
            number = float(value)
        except (ValueError, OverflowError):
            return False
        if not math.isfinite(number):
            return False
        return vr == "DS" or (number.is_integer() and -(2**31) <= number < 2**31)
    if vr == "AT":
        return isinstance(value, str) and len(value) == 8 and all(c in string.hexdigits for c in value)
    if vr in NUMBER_VRS:
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    return isinstance(value, str)


def json_values(obj: JsonObject, vr: str) -> list[Any]:
    """The values of a text or number attribute as the gateway holds them: PN groups
    joined with ``=``, integral IS numbers as ints, a JSON null as an empty string.

    Shared by ``element_from_json`` and the C-FIND answer encoder, which must agree.
    A value that cannot be one of ``vr`` (a date as a JSON number, "abc" as an IS, an
    object as a LO) is taken as empty, and a lone value not in an array as that value:
    one malformed attribute of one match, as archives send now and then, had failed a
    whole C-FIND as the gateway's internal error.
    """
    raw = obj.get("Value")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raw = [raw]
    return ["" if v is None or not _fits(vr, v) else _scalar(vr, v) for v in raw]


def json_vr(tag: int, obj: JsonObject, hint: str | None = None) -> str:
    """The VR of a DICOM JSON attribute: its own when it names one DICOM defines, else
    ``hint`` or the dictionary's (an archive's "XX" would stop the encoder)."""
    vr = obj.get("vr")
    if isinstance(vr, str) and vr in KNOWN_VRS:
        return vr
    return hint or keyword_vr(tag)


def element_from_json(tag: int, obj: JsonObject, vr_hint: str | None = None) -> DataElement:
    """One DICOM JSON attribute as a pydicom element (empty value when it has none).

    ``vr_hint`` is used when the JSON lacks ``vr``. Bulk data URIs are not fetched:
    a C-FIND answer carries no bulk data, so such elements come back empty.
    """
    vr = json_vr(tag, obj, vr_hint)
    if vr == "SQ":
        items = [dataset_from_json(item) for item in obj.get("Value") or [] if isinstance(item, Mapping)]
        return DataElement(tag, vr, Sequence(items))
    if "InlineBinary" in obj:
        return DataElement(tag, vr, base64.b64decode(obj["InlineBinary"]))
    if vr not in TEXT_VRS and vr not in NUMBER_VRS:
        return DataElement(tag, vr, None)
    values = json_values(obj, vr)
    if not values:
        return DataElement(tag, vr, None if vr not in TEXT_VRS else "")
    if len(values) == 1:
        return DataElement(tag, vr, values[0])
    return DataElement(tag, vr, values)


def dataset_from_json(obj: JsonObject, tags: Iterable[int] | None = None) -> Dataset:
    """A DICOM JSON object as a Dataset, optionally only the given tags (present ones)."""
    ds = Dataset()
    if tags is None:
        for key, value in obj.items():
            if isinstance(value, Mapping):
                try:
                    tag = int(key, 16)
                except ValueError:
                    continue
                ds.add(element_from_json(tag, value))
        return ds
    for tag in tags:
        value = obj.get(tag_key(tag))
        if isinstance(value, Mapping):
            ds.add(element_from_json(tag, value))
    return ds


def _texts(ds: Dataset) -> Iterable[str]:
    """Every text value of the data set that is subject to the character set."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value or []:
                yield from _texts(item)
        elif elem.VR in CHARSET_VRS and elem.value is not None:
            values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
            for v in values:
                yield str(v)


def _encodable(text: str, codecs: list[str]) -> bool:
    """Whether every character encodes in one of the codecs (pydicom switches between
    them per character run, so a mix of ASCII and JIS X 0208 is fine). Every codec
    pydicom maps a DICOM term to encodes ASCII, so ASCII text needs no trial."""
    if text.isascii():
        return True
    for char in text:
        for codec in codecs:
            try:
                char.encode(codec)
                break
            except (UnicodeError, LookupError):
                continue
        else:
            return False
    return True


def charset_terms(value: Any) -> list[str]:
    """SpecificCharacterSet as a list of terms ([] for the default repertoire)."""
    if value is None or value == "":
        return []
    terms = list(value) if isinstance(value, (list, MultiValue)) else [str(value)]
    terms = [str(t).strip() for t in terms]
    return [] if not any(terms) else terms


def answer_charset(ds: Dataset, requested: list[str]) -> list[str]:
    """The character set to encode an answer in: the requested one when every value
    fits it, else UTF-8 (ISO_IR 192), which holds any value without loss.

    Answering in the SCU's own set matters to workstations that only decode the set
    they asked for; falling back to UTF-8 rather than replacing characters with '?'
    keeps names intact for everyone else.
    """
    return charset_for(_texts(ds), requested)


def charset_for(texts: Iterable[str], requested: list[str]) -> list[str]:
    """``answer_charset`` over the answer's charset-dependent text values."""
    try:
        codecs = convert_encodings(requested or ["ISO_IR 6"])
    except LookupError:
        return [UTF8]
    # ISO 2022 code extensions always include ASCII in G0.
    if requested and requested[0] == "":
        codecs = ["ascii", *codecs]
    if all(_encodable(text, codecs) for text in texts):
        return requested
    return [UTF8]


def set_charset(ds: Dataset, terms: list[str]) -> None:
    """Put SpecificCharacterSet into the answer (empty for the default repertoire)."""
    if not terms:
        ds.SpecificCharacterSet = None
    elif len(terms) == 1:
        ds.SpecificCharacterSet = terms[0]
    else:
        ds.SpecificCharacterSet = terms


def empty_like(tag: int, vr: str) -> DataElement:
    """A zero-length element: the answer to a key the entity has no value for."""
    if vr == "SQ":
        return DataElement(tag, vr, Sequence())
    return DataElement(tag, vr, "" if vr in TEXT_VRS else None)
