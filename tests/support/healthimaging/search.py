"""QIDO-RS as HealthImaging's developer guide documents it ("Searching DICOM data").

Each resource accepts its own documented subset of match keys; a parameter outside
it is refused with 400 (the guide does not say what the service does with one: this
makes a client that strays from the documented keys fail loudly). Matching follows
PS3.18/PS3.4 loosely, as the gateway re-checks every answer: comma-separated lists,
``*``/``?`` wildcards, ``A-B`` ranges for dates and times, person names without
regard to case. Only primary image sets are searched. ``limit`` is at most 1000,
and no result past the 10,000th of a search can be reached.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

from tests.support.healthimaging.store import ImageSet, Instance

MAX_LIMIT = 1000
DEFAULT_LIMIT = 1000
SEARCH_REACH = 10_000
MAX_INCLUDEFIELDS = 50

STUDY_KEYS = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
    "StudyDescription", "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime",
    "StudyInstanceUID", "StudyID",
)
SERIES_KEYS = ("Modality", "SeriesInstanceUID")
INSTANCE_KEYS = ("SOPClassUID", "SOPInstanceUID")
RELATIONAL_INSTANCE_KEYS = STUDY_KEYS + (
    "Modality", "SeriesInstanceUID", "SeriesNumber", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "SOPClassUID", "SOPInstanceUID",
)
RELATIONAL_SERIES_KEYS = STUDY_KEYS + (
    "Modality", "SeriesInstanceUID", "SeriesNumber", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)

# Attributes returned without includefield (PS3.18 Table 10.6.3-3), per level.
STUDY_RETURN = (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
    "ReferringPhysicianName", "TimezoneOffsetFromUTC", "StudyDescription", "PatientName", "PatientID",
    "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN = (
    "SpecificCharacterSet", "Modality", "TimezoneOffsetFromUTC", "SeriesDescription", "StudyInstanceUID",
    "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime",
)
INSTANCE_RETURN = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "TimezoneOffsetFromUTC", "StudyInstanceUID",
    "SeriesInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
)
CONTROL_PARAMS = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


class BadQuery(Exception):
    """A search the service refuses with 400."""


def _tag_of(name: str) -> int | None:
    """A QIDO attribute ID (``00100010`` or ``PatientName``) as a tag."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    return int(tag) if tag is not None else None


def _values(ds: Dataset, keyword: str) -> list[str]:
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def _matches_one(vr: str, key: str, value: str) -> bool:
    if vr in ("DA", "TM", "DT") and "-" in key:
        low, _, high = key.partition("-")
        return (not low or value >= low) and (not high or value <= high)
    if "*" in key or "?" in key:
        pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in key)
        return re.fullmatch(pattern, value, re.IGNORECASE if vr == "PN" else 0) is not None
    return value.lower() == key.lower() if vr == "PN" else value == key


def matches(ds: Dataset, keyword: str, key: str) -> bool:
    """Does the entity's attribute match one query value (a comma-separated list)?"""
    vr = dictionary_VR(keyword)
    found = _values(ds, keyword)
    return any(_matches_one(vr, k, v) for k in key.split(",") for v in found)


@dataclass(frozen=True)
class Query:
    keys: list[tuple[str, str]]  # (keyword, value)
    include: list[str] | None  # keywords; None: every attribute
    limit: int
    offset: int


def parse_query(raw_query: str, allowed: Iterable[str]) -> Query:
    """The parameters of one search, checked against the resource's documented keys."""
    allowed = set(allowed)
    keys: list[tuple[str, str]] = []
    include: list[str] | None = []
    limit, offset = DEFAULT_LIMIT, 0
    fields = 0
    for name, value in parse_qsl(raw_query, keep_blank_values=True):
        if name == "limit":
            if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
                raise BadQuery(f"limit must be an integer from 1 to {MAX_LIMIT}")
            limit = int(value)
        elif name == "offset":
            if not value.isdigit():
                raise BadQuery("offset must be a non-negative integer")
            offset = int(value)
        elif name == "includefield":
            for item in value.split(","):
                fields += 1
                if item == "all":
                    include = None
                elif include is not None:
                    tag = _tag_of(item.split(".")[0])
                    if tag is not None and keyword_for_tag(tag):
                        include.append(keyword_for_tag(tag))
        elif name == "fuzzymatching":
            continue
        else:
            tag = _tag_of(name)
            keyword = keyword_for_tag(tag) if tag is not None else ""
            if keyword not in allowed:
                raise BadQuery(f"unsupported search parameter: {name}")
            if value:
                keys.append((keyword, value))
    if fields > MAX_INCLUDEFIELDS:
        raise BadQuery(f"at most {MAX_INCLUDEFIELDS} includefield values")
    if offset >= SEARCH_REACH:
        raise BadQuery(f"offset must be less than {SEARCH_REACH}")
    return Query(keys, include, limit, offset)


def page(items: list[Dataset], query: Query) -> list[Dataset]:
    """The window ``offset``/``limit`` asks for, never past the search reach."""
    end = min(query.offset + query.limit, SEARCH_REACH)
    return items[query.offset : end]


def study_view(image_set: ImageSet) -> Dataset:
    """A study's attributes: those of its first instance, plus the computed ones."""
    instances = list(image_set.instances.values())
    ds = _copy(instances[0].header)
    ds.ModalitiesInStudy = sorted({str(i.header.get("Modality", "")) for i in instances} - {""})
    ds.NumberOfStudyRelatedSeries = len({i.series_uid for i in instances})
    ds.NumberOfStudyRelatedInstances = len(instances)
    return ds


def series_view(image_set: ImageSet, instances: list[Instance]) -> Dataset:
    ds = _copy(instances[0].header)
    ds.NumberOfSeriesRelatedInstances = len(instances)
    ds.ModalitiesInStudy = sorted({str(i.header.get("Modality", "")) for i in image_set.instances.values()} - {""})
    return ds


def _copy(header: Dataset) -> Dataset:
    ds = Dataset()
    ds.update({elem.tag: elem for elem in header})
    return ds


def select(entities: list[Dataset], query: Query) -> list[Dataset]:
    return [ds for ds in entities if all(matches(ds, kw, value) for kw, value in query.keys)]


def to_json(ds: Dataset, defaults: Iterable[str], query: Query, extra: Callable[[Dataset], dict[str, object]]) -> dict[str, object]:
    """The answer for one entity: the level's defaults, what includefield asked, and
    ``extra`` (RetrieveURL); bulk data never inline."""
    wanted = set(defaults) | {kw for kw, _ in query.keys} | set(query.include or [])
    out = Dataset()
    for elem in ds:
        if elem.tag == 0x7FE00010 or elem.tag.is_private:
            continue
        if query.include is None or elem.keyword in wanted:
            out.add(elem)
    result: dict[str, object] = out.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda _: "")
    result = {tag: value for tag, value in result.items() if "BulkDataURI" not in value}  # type: ignore[operator]
    result.update(extra(ds))
    return result
