"""QIDO-RS searches (PS3.18 8.3.4 and 10.6): match parameters, includefield, paging.

A `Search` (``gateway.model.search``) becomes a query string here, shaped by the
client's `QidoOptions` (from ``[find]``). Every answer is re-checked by the gateway,
so a parameter may be sent in a looser form than the key (never a stricter one) or
left out entirely:

* values with characters a URL must percent-encode (space, ``^``, non-ASCII, ...)
  are sent with each such run replaced by ``*`` when ``relax_unsafe`` is set.
  Orthanc 1.10 with DICOMweb 1.7 does not decode ``%XX`` in QIDO parameters, so
  ``PatientName=VAN%20DAM`` never matches there, while ``VAN*DAM`` does;
* list keys other than UID lists are sent comma-separated only when every value is
  safe, else left to the gateway;
* keys in ``local_only`` (``find.local_match_keys``) are never sent;
* a list of UIDs longer than ``UID_LIST_CHARS`` is sent in parts, one search each
  (`split_long_lists`): a C-FIND or C-MOVE naming 600 instances would make a URL of
  40 KB, which Orthanc and common proxies refuse (their limit is 8-16 KB). Any other
  key that long is left to the gateway.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, replace
from urllib.parse import quote

from gateway.model.json import tag_key
from gateway.model.query import WILDCARD_VRS, Key
from gateway.model.search import Search

@dataclass(frozen=True)
class QidoOptions:
    """How a QIDO-RS client pages and words its searches (``[find]`` settings): these
    are the client's, not the search's, so a search means the same to every archive."""

    page_size: int = 1000
    timeout: float = 30.0  # seconds per page
    relax_unsafe: bool = True
    local_only: frozenset[int] = frozenset()  # tags never sent as match parameters


_UNRESERVED = string.ascii_letters + string.digits + "-._~"
# Characters sent literally in a query value: unreserved, the QIDO wildcards, and
# sub-delimiters with no meaning in a query string.
SAFE = frozenset(_UNRESERVED + "*?'()!$:@/")
_UNSAFE_RUN = re.compile("[^" + re.escape("".join(sorted(SAFE))) + "]+")


def upstream_value(key: Key, value: str, relax: bool) -> str | None:
    """The value to send for one key value, or None to leave the key to the gateway."""
    if all(c in SAFE for c in value) or not relax:
        return value
    if key.vr not in WILDCARD_VRS:
        return None
    relaxed = re.sub(r"\*+", "*", _UNSAFE_RUN.sub("*", value))
    return None if set(relaxed) <= {"*", "?"} else relaxed


def _key_param(key: Key, relax: bool) -> str | None:
    values = [upstream_value(key, v, relax) for v in key.values]
    if any(v is None for v in values):
        return None
    if len(values) > 1 and any("," in str(v) for v in values):
        return None
    return ",".join(str(v) for v in values)


# The most characters of one list key's values sent in one search (about 60 UIDs).
UID_LIST_CHARS = 4000


def _length(key: Key) -> int:
    return sum(len(v) + 1 for v in key.values)


def split_long_lists(search: Search) -> list[Search]:
    """The search as one or more searches whose list keys each fit ``UID_LIST_CHARS``:
    the longest UID list too long for that is split across them, and any other key
    too long for it is left out of all of them (the gateway matches it itself). Their
    answers together are the search's answers, as the UID list's matches are the
    union of its values' matches."""
    long = [k for k in search.keys if len(k.values) > 1 and _length(k) > UID_LIST_CHARS]
    if not long:
        return [search]
    uid_lists = [k for k in long if k.vr == "UI"]
    split = max(uid_lists, key=_length) if uid_lists else None
    keys = tuple(k for k in search.keys if k is split or k not in long)
    if split is None:
        return [replace(search, keys=keys)]
    parts: list[list[str]] = [[]]
    size = 0
    for value in split.values:
        if parts[-1] and size + len(value) + 1 > UID_LIST_CHARS:
            parts.append([])
            size = 0
        parts[-1].append(value)
        size += len(value) + 1
    return [
        replace(search, keys=tuple(replace(k, values=tuple(part)) if k is split else k for k in keys))
        for part in parts
    ]


def match_params(search: Search, options: QidoOptions) -> list[tuple[str, str]]:
    """``(attribute, value)`` match parameters for the search's keys."""
    params: list[tuple[str, str]] = []
    for key in search.keys:
        if key.universal or key.tag in options.local_only:
            continue
        if key.vr == "SQ":
            for sub in key.items:
                if not sub.universal and sub.vr != "SQ":
                    value = _key_param(sub, options.relax_unsafe)
                    if value is not None:
                        params.append((f"{tag_key(key.tag)}.{tag_key(sub.tag)}", value))
            continue
        value = _key_param(key, options.relax_unsafe)
        if value is not None:
            params.append((tag_key(key.tag), value))
    return params


def query_string(search: Search, options: QidoOptions, limit: int, offset: int) -> str:
    """The encoded query string of one page: match parameters, includefield, paging."""
    params = match_params(search, options)
    params += [("includefield", tag_key(t)) for t in search.include]
    if search.include_all:
        params.append(("includefield", "all"))
    params += [("limit", str(limit)), ("offset", str(offset))]
    return "&".join(f"{name}={quote(value, safe=''.join(sorted(SAFE)) + ',')}" for name, value in params)


def resource_path(level: str, study_uid: str | None, series_uid: str | None) -> str:
    """The QIDO-RS resource for a search level ("studies", "series", "instances")."""
    if level == "studies":
        return "studies"
    if level == "series":
        return f"studies/{study_uid}/series" if study_uid else "series"
    if study_uid and series_uid:
        return f"studies/{study_uid}/series/{series_uid}/instances"
    if study_uid:
        return f"studies/{study_uid}/instances"
    return "instances"
