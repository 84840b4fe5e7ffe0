"""The one File Meta reader (`gateway.part10`), used by the archive clients and the
retrieval engine alike."""

from __future__ import annotations

import pytest

from gateway.part10 import file_meta_header
from gateway.part10 import read_file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG = "1.2.840.10008.1.2.4.50"


def test_read_file_meta_finds_syntax_and_data_set_start() -> None:
    head = file_meta_header(CT, "1.2.3.4", JPEG, "SRC") + b"\x08\x00\x05\x00CS"
    assert read_file_meta(head) == (JPEG, CT, "1.2.3.4", len(head) - 6)
    with pytest.raises(ValueError):
        read_file_meta(b"\x00" * 200)


def test_read_file_meta_without_the_preamble() -> None:
    """Some archives send the meta group alone, without preamble and DICM."""
    head = file_meta_header(CT, "1.2.3.4", JPEG, "SRC")
    assert head[128:132] == b"DICM"
    assert read_file_meta(head[132:]) == (JPEG, CT, "1.2.3.4", len(head) - 132)
