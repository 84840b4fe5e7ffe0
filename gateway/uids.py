"""UID validation (PS3.5 9.1): digits and dots, no empty components, at most 64 characters.

UIDs arrive from modalities and archives; they are validated before they are used in
a URL, a database key or a log line, so that a crafted value cannot traverse a path or
break a request. Components with a leading zero, which PS3.5 forbids, are tolerated:
real devices emit them, and refusing their images would lose data for no safety gain.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID."""
    return isinstance(value, str) and len(value) <= 64 and bool(_UID_RE.match(value))


def json_uid(obj: Mapping[str, Any], tag: str) -> str | None:
    """The first value of a UID attribute of a DICOM JSON object, as text; None when
    it is absent or not shaped as DICOM JSON (an archive's answer is not trusted to be).
    Not validated: see `is_valid_uid`."""
    element = obj.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values or values[0] is None:
        return None
    return str(values[0])
