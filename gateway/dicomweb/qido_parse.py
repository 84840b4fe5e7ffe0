"""A QIDO-RS request's query string (PS3.18 8.3.4) as the core's query model.

The server side of ``gateway.dicomweb.qido``: match parameters by keyword or tag
(``PatientName=SIIM*``, ``00100010=SIIM*``, ``00081032.00080100=X`` inside a
sequence), comma-separated values as list matching, ``includefield`` (``all``
included), ``limit``, ``offset`` and ``fuzzymatching``. Keys become the same `Key`
values C-FIND builds (``gateway.model.query.make_key``), so QIDO-RS and C-FIND match
alike. Errors are QueryError/InvalidValue naming the parameter, never its value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataelem import DataElement
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from gateway.dicomweb.params import whole_number
from gateway.model.json import keyword_vr
from gateway.model.query import LEVELS, InvalidValue, Key, Model, QueryError, attribute_level, make_key, tag_name
from gateway.model.search import Search

# The resource level of each QIDO-RS path.
LEVEL_OF_RESOURCE = {"studies": "STUDY", "series": "SERIES", "instances": "IMAGE"}
# Content negotiation parameters (PS3.18 8.3.3), read by the route, not match keys.
NEGOTIATION = frozenset({"accept", "charset"})
STUDY_UID, SERIES_UID = 0x0020000D, 0x0020000E


@dataclass(frozen=True)
class QidoRequest:
    """One parsed search: the `Search` to ask, the keys to re-check every answer with,
    and the paging the client asked for (None: everything up to the gateway's cap)."""

    level: str
    search: Search
    keys: tuple[Key, ...]
    limit: int | None
    offset: int
    fuzzy: bool

    def matches(self, entity: Dataset) -> bool:
        return all(k.matches(entity) for k in self.keys)


def attribute_tag(name: str) -> int:
    """A keyword or eight hex digits as a tag; QueryError naming the parameter."""
    if len(name) == 8:
        try:
            return int(name, 16)
        except ValueError:
            pass
    tag = tag_for_keyword(name)
    if tag is None:
        raise QueryError(f"{name[:64]}: not a DICOM keyword or tag")
    return int(tag)


def _element(tag: int, values: list[str]) -> DataElement:
    vr = keyword_vr(tag)
    value: list[str] | str = values if len(values) > 1 else values[0]
    return DataElement(tag, vr, value, already_converted=True)


def _number(name: str, text: str) -> int:
    number = whole_number(text)
    if number is None:
        raise QueryError(f"{name}: not a non-negative integer")
    return number


def parse_qido(
    resource: str, params: Iterable[tuple[str, str]], study_uid: str | None = None, series_uid: str | None = None
) -> QidoRequest:
    """Parse the query string of a search on ``resource`` (studies, series, instances)
    within the UIDs of its path."""
    level = LEVEL_OF_RESOURCE[resource]
    include: list[int] = []
    include_all = False
    limit: int | None = None
    offset = 0
    fuzzy = False
    plain: dict[int, list[str]] = {}
    nested: dict[int, Dataset] = {}
    for name, value in params:
        lowered = name.lower()
        if name in NEGOTIATION:
            continue
        if lowered == "includefield":
            for field in value.split(","):
                field = field.strip()
                if field.lower() == "all":
                    include_all = True
                elif field:
                    include.append(attribute_tag(field.split(".")[0]))
            continue
        if lowered == "limit":
            limit = _number(name, value)
            continue
        if lowered == "offset":
            offset = _number(name, value)
            continue
        if lowered == "fuzzymatching":
            fuzzy = value.strip().lower() == "true"
            continue
        path = name.split(".")
        if len(path) > 2:
            raise QueryError(f"{name[:64]}: sequence matching goes one level deep only")
        tags = [attribute_tag(p) for p in path]
        values = [v for v in value.split(",")] if value else [""]
        if len(tags) == 1:
            if value and keyword_vr(tags[0]) == "SQ":
                raise QueryError(
                    f"{tag_name(tags[0])}: a sequence takes no value; match on an attribute of its items"
                    f" ({tag_name(tags[0])}.<attribute>=<value>)"
                )
            plain.setdefault(tags[0], []).extend(values)
        else:
            if keyword_vr(tags[0]) != "SQ":
                raise QueryError(f"{tag_name(tags[0])}: not a sequence")
            item = nested.setdefault(tags[0], Dataset())
            item.add(_element(tags[1], values))
    keys: list[Key] = []
    try:
        for tag, values in plain.items():
            keys.append(make_key(_element(tag, values)))
        for tag, item in nested.items():
            keys.append(make_key(DataElement(tag, "SQ", [item])))
    except QueryError:
        raise
    except (ValueError, TypeError, LookupError):
        raise InvalidValue("a match parameter has an unreadable value") from None
    if study_uid:
        keys = [k for k in keys if k.tag != STUDY_UID] + [make_key(DataElement(STUDY_UID, "UI", study_uid))]
    if series_uid:
        keys = [k for k in keys if k.tag != SERIES_UID] + [make_key(DataElement(SERIES_UID, "UI", series_uid))]
    below = [
        k.tag
        for k in keys
        if not k.universal and LEVELS.index(attribute_level(k.tag, Model.STUDY_ROOT)) > LEVELS.index(level)
    ]
    if below:
        raise QueryError(f"keys below the {resource} level: {', '.join(tag_name(t) for t in below)}", below)
    match_keys = tuple(k for k in keys if not k.universal)
    requested = tuple(dict.fromkeys([*include, *(k.tag for k in keys)]))
    in_path = {STUDY_UID} if study_uid else set()
    in_path |= {SERIES_UID} if series_uid else set()
    search = Search(
        keys=tuple(k for k in match_keys if k.tag not in in_path),
        include=requested,
        include_all=include_all,
        study_uid=study_uid,
        series_uid=series_uid if study_uid else None,
    )
    if series_uid and not study_uid:
        raise QueryError("a series in the path needs its study")
    return QidoRequest(level, search, match_keys, limit, offset, fuzzy)
