"""Reading a STOW-RS response (PS3.18 10.5.3) into per-instance outcomes.

The archive answers with a Store Instances Response Module in DICOM JSON (or XML):
ReferencedSOPSequence (0008,1199) lists what it stored, FailedSOPSequence (0008,1198)
what it did not, each with a FailureReason (0008,1197).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"

# FailureReason values meaning "the archive already has this instance": PS3.18's
# duplicate SOP instance (0x0111) and Azure's 45070 ("instance already exists").
ALREADY_STORED = frozenset({0x0111, 45070})
# Reasons worth retrying: out of resources, processing failure, resource limitation,
# and Azure's 45071 (the instance is being created by another request, or the clean-up
# of an earlier failed attempt, such as ours cut by a timeout, is not finished).
TRANSIENT = frozenset({0x0110, 0x0213, 0xA700, 45071}) | frozenset(range(0xA700, 0xA800))


@dataclass
class StowResponse:
    referenced: set[str] = field(default_factory=set)
    failed: dict[str, int] = field(default_factory=dict)
    parsed: bool = False


def _from_json(body: bytes) -> StowResponse:
    data = json.loads(body)
    if isinstance(data, list):  # some servers wrap the module in an array
        data = data[0] if data else {}
    out = StowResponse(parsed=True)
    for item in (data.get(REFERENCED_SOP_SEQUENCE) or {}).get("Value") or []:
        for uid in (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []:
            out.referenced.add(uid)
    for item in (data.get(FAILED_SOP_SEQUENCE) or {}).get("Value") or []:
        reasons = (item.get(FAILURE_REASON) or {}).get("Value") or [0]
        for uid in (item.get(REFERENCED_SOP_INSTANCE_UID) or {}).get("Value") or []:
            out.failed[uid] = int(reasons[0])
    return out


def _from_xml(body: bytes) -> StowResponse:
    root = ET.fromstring(body)
    out = StowResponse(parsed=True)

    def items(tag: str) -> list[ET.Element]:
        attr = root.find(f"DicomAttribute[@tag='{tag}']")
        return [] if attr is None else attr.findall("Item")

    def value(item: ET.Element, tag: str) -> str | None:
        node = item.find(f"DicomAttribute[@tag='{tag}']/Value")
        return None if node is None or node.text is None else node.text.strip()

    for item in items(REFERENCED_SOP_SEQUENCE):
        if uid := value(item, REFERENCED_SOP_INSTANCE_UID):
            out.referenced.add(uid)
    for item in items(FAILED_SOP_SEQUENCE):
        if uid := value(item, REFERENCED_SOP_INSTANCE_UID):
            out.failed[uid] = int(value(item, FAILURE_REASON) or 0)
    return out


def parse_stow_response(body: bytes, content_type: str) -> StowResponse:
    """Parse the body; an empty or unreadable body gives ``parsed=False``."""
    if not body.strip():
        return StowResponse()
    try:
        if "xml" in content_type:
            return _from_xml(body)
        return _from_json(body)
    except (ValueError, ET.ParseError, AttributeError, TypeError, IndexError, RecursionError):
        return StowResponse()
