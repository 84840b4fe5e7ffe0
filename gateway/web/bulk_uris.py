"""BulkDataURIs of the metadata the facade answers, pointed at its own bulkdata resource.

The archive's URIs are relative (the embedded archive) or name the archive's own host,
which the client may not reach, so each one becomes
``<root>/studies/<study>/series/<series>/instances/<sop>/bulkdata/<tag path>``. The root
depends on the request (its Host and X-Forwarded-* headers), so metadata the facade
keeps holds `FACADE_ROOT` in its place, put right by a plain replace of the answer's
text (`with_root`): a kept answer is served without parsing and serialising it again.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway.uids import is_valid_uid, json_uid
from gateway.upstream.base import MetadataText

# Stands in for the request's root in kept metadata.
FACADE_ROOT = "urn:dicom-gateway:facade-root"
_BULK_SEGMENT = re.compile(r"(?:^|/)bulk(?:data)?/(.+)$", re.IGNORECASE)


def rewrite_bulk_uris(obj: dict[str, Any], base: str) -> None:
    """Point every BulkDataURI of an instance's metadata (sequences included) at
    ``base`` + its tag path; a URI with no bulk data segment stays as it is."""
    for value in obj.values():
        if not isinstance(value, dict):
            continue
        uri = value.get("BulkDataURI")
        if isinstance(uri, str):
            match = _BULK_SEGMENT.search(uri.split("?", 1)[0])
            if match:
                value["BulkDataURI"] = base + match.group(1).upper()
        items = value.get("Value")
        if value.get("vr") == "SQ" and isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    rewrite_bulk_uris(item, base)


def point_at_facade(obj: dict[str, Any], root: str, study: str) -> None:
    """Point an instance's BulkDataURIs at the facade under ``root`` (``study``: the
    one the request named, for an object that does not carry its own); an object
    without valid UIDs keeps the archive's."""
    study, series, sop = json_uid(obj, "0020000D") or study, json_uid(obj, "0020000E"), json_uid(obj, "00080018")
    if all(is_valid_uid(u) for u in (study, series, sop)):
        rewrite_bulk_uris(obj, f"{root}/studies/{study}/series/{series}/instances/{sop}/bulkdata/")


# How a relative BulkDataURI begins in an archive's metadata text serialised with
# json.dumps' default separators (`archive_metadata.metadata_text`). Within a string
# value its quotes would be escaped, so only a BulkDataURI member matches it.
_RELATIVE_URI = '"BulkDataURI": "bulkdata/'


def pointed_text(kept: MetadataText, root: str) -> str:
    """An instance's kept metadata text with its relative BulkDataURIs pointed at the
    facade under ``root``: what `point_at_facade` and serialising give, without
    parsing (an instance without valid UIDs keeps its URIs, as there)."""
    uids = (kept.study_uid, kept.series_uid, kept.sop_instance_uid)
    if not all(is_valid_uid(u) for u in uids):
        return kept.text
    base = f"{root}/studies/{kept.study_uid}/series/{kept.series_uid}/instances/{kept.sop_instance_uid}/bulkdata/"
    return kept.text.replace(_RELATIVE_URI, '"BulkDataURI": ' + json.dumps(base, ensure_ascii=False)[:-1])


def with_root(body: bytes, root: str) -> bytes:
    """Kept metadata's text with the request's root in place of `FACADE_ROOT`."""
    return body.replace(FACADE_ROOT.encode(), json.dumps(root, ensure_ascii=False)[1:-1].encode("utf-8"))
