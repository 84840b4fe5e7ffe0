"""The README's DICOM conformance summary says what the code does: the implementation
identity the association PDUs carry, every transfer syntax storage contexts accept,
every SOP class the SCP serves."""

from __future__ import annotations

from pathlib import Path

from gateway.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.dimse.command import STORAGE_COMMITMENT, VERIFICATION
from gateway.dimse.server import STORAGE_TRANSFER_SYNTAXES, UNCOMPRESSED

README = Path(__file__).resolve().parents[1] / "README.md"


def summary() -> str:
    text = README.read_text()
    return text[text.index("## DICOM conformance (summary)") : text.index("## Performance")]


def test_the_summary_names_what_the_code_negotiates() -> None:
    text = summary()
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in text and f"`{IMPLEMENTATION_VERSION_NAME}`" in text
    for syntax in STORAGE_TRANSFER_SYNTAXES:
        assert f"`{syntax}`" in text, syntax
    for uid in (VERIFICATION, STORAGE_COMMITMENT):
        assert f"`{uid}`" in text, uid
    assert len(UNCOMPRESSED) == 3 and "Explicit VR Big Endian" in text
