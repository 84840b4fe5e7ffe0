"""The C-FIND Identifier as a query model, and the matching rules of PS3.4 C.2.2.2.

One module holds both directions because they must agree: what a key means when it
is sent upstream (``gateway.dicomweb.qido``) and when the gateway filters answers
itself (every answer is re-checked here, so an archive that ignores or loosens a
parameter never produces a wrong match), and when the embedded archive evaluates
it. Rules, in short:

* empty key: universal matching, the key is only returned;
* ``\\``-separated values: list matching, any value may match (UID lists, and
  multi-valued keys such as ModalitiesInStudy);
* ``*`` and ``?``: wildcards, for text VRs other than DA/TM/DT/UI and numbers;
* ``A-B``, ``A-``, ``-B`` for DA/TM/DT: ranges, bounds included; a Date and a Time
  key are matched independently (combined date-time matching is an extended
  negotiation option the SCP does not offer);
* PN: case-insensitive, trailing empty components ignored; a key with no ``=``
  matches any component group (alphabetic, ideographic or phonetic), a key with
  groups matches group by group;
* SQ with an item of keys: an entity matches if one of its items matches all of
  them; answers carry the matching items, reduced to the requested keys;
* an entity without a value for a non-universal key does not match.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from gateway.model.json import answer_charset, charset_terms, empty_like, keyword_vr, set_charset
from gateway.uids import is_valid_uid

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEY = {"PATIENT": 0x00100020, "STUDY": 0x0020000D, "SERIES": 0x0020000E, "IMAGE": 0x00080018}

SPECIFIC_CHARACTER_SET = 0x00080005
QUERY_RETRIEVE_LEVEL = 0x00080052
RETRIEVE_AE_TITLE = 0x00080054


class Model(Enum):
    """The Query/Retrieve information model, named by its FIND SOP Class."""

    PATIENT_ROOT = PATIENT_ROOT_FIND
    STUDY_ROOT = STUDY_ROOT_FIND


def _tags(*keywords: str) -> frozenset[int]:
    return frozenset(int(tag_for_keyword(k)) for k in keywords)  # type: ignore[arg-type]


# Attribute levels (PS3.4 C.6.1.1 and C.6.2.1, plus common optional keys). Anything
# not listed is an instance-level (IMAGE) attribute.
PATIENT_ATTRIBUTES = _tags(
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "EthnicGroup", "PatientComments", "PatientMotherBirthName",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson",
    "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances",
)
STUDY_ATTRIBUTES = _tags(
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "StudyInstanceUID", "ReferringPhysicianName", "StudyDescription", "ProcedureCodeSequence",
    "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription", "PatientAge", "PatientSize",
    "PatientWeight", "Occupation", "AdditionalPatientHistory", "ModalitiesInStudy",
    "SOPClassesInStudy", "AnatomicRegionsInStudyCodeSequence", "OtherStudyNumbers",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstitutionalDepartmentName",
    "StudyStatusID", "TimezoneOffsetFromUTC",
)
SERIES_ATTRIBUTES = _tags(
    "Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "Laterality", "ProtocolName", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "PerformedProcedureStepID", "RequestAttributesSequence",
    "NumberOfSeriesRelatedInstances", "OperatorsName", "PerformingPhysicianName", "Manufacturer",
    "ManufacturerModelName", "InstitutionName", "StationName", "FrameOfReferenceUID",
)
ATTRIBUTE_LEVEL = (
    {t: "PATIENT" for t in PATIENT_ATTRIBUTES}
    | {t: "STUDY" for t in STUDY_ATTRIBUTES}
    | {t: "SERIES" for t in SERIES_ATTRIBUTES}
)

WILDCARD_VRS = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"})
RANGE_VRS = frozenset({"DA", "TM", "DT"})
NUMBER_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})


def attribute_level(tag: int, model: Model) -> str:
    """The level an attribute belongs to; in Study Root, patient attributes are STUDY's."""
    level = ATTRIBUTE_LEVEL.get(tag, "IMAGE")
    if level == "PATIENT" and model is Model.STUDY_ROOT:
        return "STUDY"
    return level


class QueryError(Exception):
    """The request does not fit the information model (a level it lacks, a relational
    query, keys below the level, matching it cannot do). Fronts map it: C-FIND 0xA900,
    QIDO-RS 400. ``offending`` lists the tags at fault, for OffendingElement.

    The message is logged and sent as ErrorComment: it names keys, never quotes their
    values, which may be a patient's name, ID or birth date.
    """

    def __init__(self, message: str, offending: Iterable[int] = ()) -> None:
        super().__init__(message)
        self.offending = list(offending)


class InvalidValue(QueryError):
    """A key's value cannot be parsed (a malformed date range, number or UID). Fronts
    map it: C-FIND 0xC000, QIDO-RS 400."""


def tag_name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# -- value matchers ----------------------------------------------------------------


def wildcard_match(pattern: str, value: str) -> bool:
    """Whether ``value`` matches a C-FIND wildcard ``pattern`` (``*``: any run, ``?``:
    any one character; PS3.4 C.2.2.2.4), whole. Greedy with one backtrack point, so it
    takes at most len(pattern) x len(value) steps: a regular expression made of the
    pattern backtracks exponentially, and one query of ``*a`` twenty times then ``b``
    held the event loop, and every association and request with it, for good."""
    p = v = 0
    star, mark = -1, 0
    while v < len(value):
        if p < len(pattern) and pattern[p] == "*":
            star, mark = p, v  # the run of the latest star starts empty here
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", value[v]):
            p += 1
            v += 1
        elif star >= 0:
            mark += 1  # that star takes one character more
            p, v = star + 1, mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def _text_matcher(value: str, vr: str, ignore_case: bool) -> Callable[[str], bool]:
    if vr in WILDCARD_VRS and ("*" in value or "?" in value):
        if ignore_case:
            folded = value.casefold()
            return lambda v: wildcard_match(folded, v.casefold())
        return lambda v: wildcard_match(value, v)
    if ignore_case:
        folded = value.casefold()
        return lambda v: v.casefold() == folded
    return lambda v: v == value


def _strip_pn_group(group: str) -> str:
    return group.rstrip(" ^")


def _pn_matcher(value: str) -> Callable[[str], bool]:
    key_groups = [_strip_pn_group(g) for g in value.split("=")]
    group_matchers = [_text_matcher(g, "PN", True) if g and g != "*" else None for g in key_groups]
    if len(key_groups) == 1:
        whole = group_matchers[0]
        assert whole is not None

        def any_group(v: str) -> bool:
            groups = [_strip_pn_group(g) for g in v.split("=")]
            return any(whole(g) for g in groups if g) or whole(v.rstrip(" =^"))

        return any_group

    def by_group(v: str) -> bool:
        groups = [_strip_pn_group(g) for g in v.split("=")]
        groups += [""] * (len(group_matchers) - len(groups))
        return all(m is None or m(g) for m, g in zip(group_matchers, groups))

    return by_group


def _normalise_time(value: str, fill: str) -> str:
    value = value.replace(":", "")
    head, _, frac = value.partition(".")
    head = head.ljust(6, fill)
    return f"{head}.{frac.ljust(6, fill)}"


def _normalise_dt(value: str, fill: str) -> str:
    value = re.sub(r"[+-]\d{4}$", "", value)  # offsets from UTC are ignored when comparing
    head, _, frac = value.partition(".")
    return f"{head.ljust(14, fill)}.{frac.ljust(6, fill)}"


def normalise(vr: str, value: str, fill: str = "0") -> str:
    """A DA/TM/DT value as a fixed-width string that orders like the instant it names.

    ``fill='9'`` makes a partial upper bound include everything it starts (``-13``
    for TM means up to 13:59:59.999999).
    """
    value = value.strip()
    if vr == "DA":
        return value.replace(".", "").ljust(8, fill)
    if vr == "TM":
        return _normalise_time(value, fill)
    return _normalise_dt(value, fill)


_RANGE_SYNTAX = {
    "DA": re.compile(r"^\d{8}$|^\d{4}\.\d{2}\.\d{2}$"),
    "TM": re.compile(r"^\d{2}(:?\d{2}(:?\d{2}(\.\d{1,6})?)?)?$"),
    "DT": re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?)?)?)?([+-]\d{4})?$"),
}


def _plausible(vr: str, value: str) -> bool:
    """Field ranges of a syntactically valid DA/TM/DT value (month 1-12, hour < 24...)."""
    whole = re.sub(r"[+-]\d{4}$", "", value) if vr == "DT" else value
    digits = re.sub(r"[^0-9]", "", whole.split(".")[0] if vr != "DA" else whole)
    if vr == "TM":
        digits = "19700101" + digits  # line the time fields up with DT's
    for start, end, low, high in [(4, 6, 1, 12), (6, 8, 1, 31), (8, 10, 0, 23), (10, 12, 0, 59), (12, 14, 0, 60)]:
        if len(digits) >= end and not low <= int(digits[start:end]) <= high:
            return False
    return True


@dataclass(frozen=True)
class Range:
    """A DA/TM/DT key value: single (low == high) or a range with open ends."""

    low: str | None
    high: str | None

    def contains(self, normalised_low: str, normalised_high: str) -> bool:
        return (self.low is None or normalised_high >= self.low) and (
            self.high is None or normalised_low <= self.high
        )


def parse_range(vr: str, text: str, tag: int) -> Range:
    """Parse one DA/TM/DT key value; InvalidValue if malformed."""
    text = text.strip()
    if "-" in text and not (vr == "DT" and re.fullmatch(r"[^-]+[+-]\d{4}", text)):
        low_text, _, high_text = text.partition("-") if vr != "DT" else _split_dt_range(text)
    else:
        low_text = high_text = text
    for part in (low_text, high_text):
        if part and not (_RANGE_SYNTAX[vr].match(part) and _plausible(vr, part)):
            raise InvalidValue(f"{tag_name(tag)}: not a {vr} value or range", [tag])
    if not low_text and not high_text:
        raise InvalidValue(f"{tag_name(tag)}: '-' is not a range", [tag])
    return Range(
        normalise(vr, low_text, "0") if low_text else None,
        normalise(vr, high_text, "9") if high_text else None,
    )


def _split_dt_range(text: str) -> tuple[str, str, str]:
    """Split a DT range at the '-' that is not part of a UTC offset."""
    match = re.fullmatch(r"([^-]*?(?:[+-]\d{4})?)-(.*)", text)
    if not match:
        return text, "", text
    return match.group(1), "-", match.group(2)


def _range_matcher(vr: str, ranges: list[Range]) -> Callable[[str], bool]:
    def match(v: str) -> bool:
        try:
            low, high = normalise(vr, v, "0"), normalise(vr, v, "9")
        except (ValueError, AttributeError):
            return False
        return any(r.contains(low, high) for r in ranges)

    return match


def _number_matcher(values: list[str], tag: int) -> Callable[[str], bool]:
    try:
        wanted = {float(v) for v in values}
    except ValueError:
        raise InvalidValue(f"{tag_name(tag)}: not a number", [tag]) from None

    def match(v: Any) -> bool:
        try:
            return float(v) in wanted
        except (TypeError, ValueError):
            return False

    return match


def entity_values(elem: DataElement | None) -> list[str]:
    """The values of an entity's element as strings ([] when absent or empty)."""
    if elem is None or elem.value is None or elem.value == "":
        return []
    values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    return [str(v).rstrip(" ") if elem.VR != "UT" else str(v) for v in values if v is not None and str(v) != ""]


# -- keys and queries --------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One key of the identifier: what to return and, unless universal, what to match."""

    tag: int
    vr: str
    values: tuple[str, ...] = ()
    items: tuple[Key, ...] = ()  # sub-keys of a sequence key
    ranges: tuple[Range, ...] = ()
    matcher: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)

    @property
    def universal(self) -> bool:
        if self.vr == "SQ":
            return all(k.universal for k in self.items)
        return not self.values

    @property
    def has_wildcard(self) -> bool:
        return self.vr in WILDCARD_VRS and any("*" in v or "?" in v for v in self.values)

    def matches(self, ds: Dataset) -> bool:
        """Whether the entity's value for this key matches (True when universal)."""
        if self.universal:
            return True
        elem = ds.get(self.tag)
        if self.vr == "SQ":
            if elem is None or elem.VR != "SQ":
                return False
            return any(all(k.matches(item) for k in self.items) for item in elem.value or [])
        return self.matches_texts(entity_values(elem))

    def matches_texts(self, values: Iterable[str]) -> bool:
        """Whether one of an entity's values (as ``entity_values`` gives them) matches
        this non-sequence key: the one rule both answer paths of C-FIND apply."""
        if self.universal:
            return True
        assert self.matcher is not None
        return any(self.matcher(v) for v in values)

    def answer(self, ds: Dataset) -> DataElement:
        """The element to return for this key: the entity's value or an empty one."""
        elem = ds.get(self.tag)
        if elem is None:
            return empty_like(self.tag, self.vr)
        if elem.VR == "SQ" and self.items:
            items = []
            for item in elem.value or []:
                if all(k.matches(item) for k in self.items):
                    reduced = Dataset()
                    for k in self.items:
                        reduced.add(k.answer(item))
                    items.append(reduced)
            return DataElement(self.tag, "SQ", Sequence(items))
        return DataElement(self.tag, elem.VR, elem.value)


def uid_key(tag: int, uids: tuple[str, ...] | list[str]) -> Key:
    """A key matching any of ``uids`` (list of UID matching, PS3.4 C.2.2.2.2)."""
    return make_key(DataElement(tag, "UI", list(uids) if len(uids) > 1 else uids[0]))


def make_key(elem: DataElement) -> Key:
    """A Key from an identifier element (values already decoded to text)."""
    tag = int(elem.tag)
    vr = elem.VR if elem.VR and elem.VR != "UN" else keyword_vr(tag)
    if vr == "SQ":
        items = elem.value or []
        sub = tuple(make_key(e) for e in items[0]) if items else ()
        return Key(tag, vr, items=sub)
    values = tuple(v for v in entity_values(elem) if v.strip() != "")
    values = tuple(v.strip() if vr not in ("PN",) else v.rstrip() for v in values)
    if vr == "PN" and any(v.strip(" ^=*") == "" for v in values):
        values = ()  # "*", "^" or "*^*" alone: universal, as SCUs send it
    elif vr in WILDCARD_VRS and any(set(v) <= {"*"} for v in values):
        values = ()  # PS3.4 C.2.2.2.4: a lone "*" is universal matching
    if not values:
        return Key(tag, vr)
    if vr in BINARY_VRS:
        raise QueryError(f"{tag_name(tag)}: matching on {vr} values is not supported", [tag])
    if vr == "UI":
        for v in values:
            if not is_valid_uid(v):
                raise InvalidValue(f"{tag_name(tag)}: not a valid UID", [tag])
        wanted = frozenset(values)
        return Key(tag, vr, values, matcher=lambda v: v in wanted)
    if vr in RANGE_VRS:
        ranges = tuple(parse_range(vr, v, tag) for v in values)
        return Key(tag, vr, values, ranges=ranges, matcher=_range_matcher(vr, list(ranges)))
    if vr in NUMBER_VRS:
        return Key(tag, vr, values, matcher=_number_matcher(list(values), tag))
    if vr == "PN":
        matchers = [_pn_matcher(v) for v in values]
        return Key(tag, vr, values, matcher=lambda v: any(m(v) for m in matchers))
    matchers = [_text_matcher(v, vr, False) for v in values]
    return Key(tag, vr, values, matcher=lambda v: any(m(v) for m in matchers))


@dataclass(frozen=True)
class Query:
    """A validated C-FIND request: level, keys, character set and negotiated options."""

    model: Model
    level: str
    keys: tuple[Key, ...]
    charset: tuple[str, ...] = ()

    def key(self, tag: int) -> Key | None:
        return next((k for k in self.keys if k.tag == tag), None)

    def uid(self, level: str) -> str | None:
        """The single UID the identifier names at ``level``, if it names exactly one."""
        key = self.key(UNIQUE_KEY[level])
        if key is None or len(key.values) != 1 or key.has_wildcard:
            return None
        return key.values[0]

    def level_of(self, tag: int) -> str:
        return attribute_level(tag, self.model)

    def is_below(self, tag: int) -> bool:
        """Whether the attribute belongs to a level below the query level."""
        return LEVELS.index(self.level_of(tag)) > LEVELS.index(self.level)

    @property
    def match_keys(self) -> tuple[Key, ...]:
        """Keys that restrict the answer (not universal, not below the query level)."""
        return tuple(k for k in self.keys if not k.universal and not self.is_below(k.tag))

    def matches(self, ds: Dataset) -> bool:
        """Whether an entity (its attributes at this level and above) matches every key."""
        return all(key.matches(ds) for key in self.match_keys)

    def answer(self, ds: Dataset, ae_title: str) -> Dataset:
        """The C-FIND response identifier: exactly the requested keys, plus the level,
        our AE title as RetrieveAETitle and the character set the values are in."""
        out = Dataset()
        out.QueryRetrieveLevel = self.level
        out.RetrieveAETitle = ae_title
        for key in self.keys:
            if key.tag == RETRIEVE_AE_TITLE:
                continue
            out.add(empty_like(key.tag, key.vr) if self.is_below(key.tag) else key.answer(ds))
        set_charset(out, answer_charset(out, list(self.charset)))
        return out


def parse_identifier(identifier: Dataset, model: Model) -> Query:
    """Validate an identifier against the model's hierarchy and build the Query.

    Raises QueryError for a level the model lacks, a missing unique key of a level
    above (a relational query; relational queries are an extended negotiation option
    the SCP does not offer), or a non-empty key below the query level; InvalidValue
    for values that cannot be parsed.
    """
    level_elem = identifier.get(QUERY_RETRIEVE_LEVEL)
    level = str(level_elem.value).strip().upper() if level_elem is not None and level_elem.value else ""
    if level not in LEVELS:
        raise QueryError(f"QueryRetrieveLevel is not one of {', '.join(LEVELS)}", offending=[QUERY_RETRIEVE_LEVEL])
    if model is Model.STUDY_ROOT and level == "PATIENT":
        raise QueryError("Study Root has no PATIENT level", offending=[QUERY_RETRIEVE_LEVEL])
    charset = tuple(charset_terms(identifier.get("SpecificCharacterSet")))
    keys: list[Key] = []
    for elem in identifier:
        tag = int(elem.tag)
        if tag in (SPECIFIC_CHARACTER_SET, QUERY_RETRIEVE_LEVEL) or elem.tag.group <= 0x0002:
            continue
        try:
            keys.append(make_key(elem))
        except QueryError:
            raise
        except (ValueError, TypeError, LookupError):
            raise InvalidValue(f"{tag_name(tag)}: unreadable value", [tag]) from None
    query = Query(model, level, tuple(keys), charset)
    first = 1 if model is Model.STUDY_ROOT else 0
    for upper in LEVELS[first : LEVELS.index(level)]:
        tag = UNIQUE_KEY[upper]
        if query.uid(upper) is None:
            raise QueryError(f"{level} query needs one {tag_name(tag)} (hierarchical search)", offending=[tag])
    below = [k.tag for k in keys if not k.universal and query.is_below(k.tag)]
    if below:
        raise QueryError(f"keys below the {level} level: {', '.join(tag_name(t) for t in below)}", offending=below)
    return query
