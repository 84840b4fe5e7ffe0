"""Reading the gateway's audit messages (DICOM PS3.15 A.5 XML) in tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path


def event_of(message: ET.Element) -> tuple[str, str]:
    """(EventID code, EventActionCode) of one message."""
    ident = message.find("EventIdentification")
    assert ident is not None
    event_id = ident.find("EventID")
    assert event_id is not None
    return event_id.get("csd-code", ""), ident.get("EventActionCode", "")


def participants(message: ET.Element) -> dict[str, ET.Element]:
    return {p.get("UserID", ""): p for p in message.findall("ActiveParticipant")}


def file_messages(path: Path) -> list[ET.Element]:
    """The messages of an ``[audit] file`` trail, one per line after its time stamp."""
    if not path.exists():
        return []
    return [ET.fromstring(line.split(" - ", 1)[1]) for line in path.read_text(encoding="utf-8").splitlines()]
