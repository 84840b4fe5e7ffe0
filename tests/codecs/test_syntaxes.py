"""The transfer syntax table matches the brief and what pydicom can really do."""

from __future__ import annotations

import pytest
from pydicom.pixels import get_decoder

from gateway.codecs import SYNTAXES, Fidelity, TranscodeError, syntax_info

EXPECTED = {
    # uid: (encapsulated, fidelity, can_encode)
    "1.2.840.10008.1.2": (False, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.1": (False, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.1.99": (False, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.2": (False, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.4.50": (True, Fidelity.LOSSY, True),
    "1.2.840.10008.1.2.4.51": (True, Fidelity.LOSSY, False),
    "1.2.840.10008.1.2.4.57": (True, Fidelity.LOSSLESS, False),
    "1.2.840.10008.1.2.4.70": (True, Fidelity.LOSSLESS, False),
    "1.2.840.10008.1.2.4.80": (True, Fidelity.LOSSLESS, False),
    "1.2.840.10008.1.2.4.81": (True, Fidelity.LOSSY, False),
    "1.2.840.10008.1.2.4.90": (True, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.4.91": (True, Fidelity.EITHER, True),
    "1.2.840.10008.1.2.4.201": (True, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.4.202": (True, Fidelity.LOSSLESS, True),
    "1.2.840.10008.1.2.4.203": (True, Fidelity.EITHER, True),
    "1.2.840.10008.1.2.5": (True, Fidelity.LOSSLESS, True),
}


def test_table_covers_exactly_the_handled_syntaxes() -> None:
    assert set(SYNTAXES) == set(EXPECTED)


@pytest.mark.parametrize("uid", sorted(EXPECTED))
def test_row(uid: str) -> None:
    info = syntax_info(uid)
    encapsulated, fidelity, can_encode = EXPECTED[uid]
    assert (info.encapsulated, info.fidelity, info.can_encode) == (
        encapsulated,
        fidelity,
        can_encode,
    )
    assert info.can_decode
    # Only JPEG baseline is encoded lossily; .91/.203 get reversible codestreams.
    assert info.encode_lossless == (can_encode and uid != "1.2.840.10008.1.2.4.50")


@pytest.mark.parametrize("uid", sorted(EXPECTED))
def test_decode_claim_matches_pydicom(uid: str) -> None:
    assert get_decoder(uid).is_available


def test_htj2k_decoding_goes_through_imagecodecs() -> None:
    for uid in ("1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"):
        assert "imagecodecs" in get_decoder(uid).available_plugins


def test_unknown_syntax_is_named_in_the_error() -> None:
    with pytest.raises(TranscodeError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        syntax_info("1.2.840.10008.1.2.4.100")
