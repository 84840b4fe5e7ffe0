"""`parse_qido` on sequence attributes: a value given to the sequence itself is refused
by name (it was a 500), an empty one asks it back, its items' attributes match."""

from __future__ import annotations

import pytest

from gateway.dicomweb.qido_parse import parse_qido
from gateway.model.query import QueryError

REFERENCED_SOP = 0x00081199


@pytest.mark.parametrize("name", ["ReferencedSOPSequence", "00081199"])
def test_a_value_for_a_sequence_itself_is_refused_by_name(name: str) -> None:
    with pytest.raises(QueryError, match="ReferencedSOPSequence: a sequence takes no value"):
        parse_qido("instances", [(name, "x")])


def test_an_empty_sequence_key_asks_it_back_and_its_items_match() -> None:
    asked = parse_qido("instances", [("ReferencedSOPSequence", "")])
    assert REFERENCED_SOP in asked.search.include and not asked.keys
    matched = parse_qido("instances", [("ReferencedSOPSequence.ReferencedSOPClassUID", "1.2.3")])
    assert [key.tag for key in matched.keys] == [REFERENCED_SOP]
