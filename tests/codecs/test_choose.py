"""choose_transfer_syntax: prefer no conversion, then lossless, lossy only when allowed."""

from __future__ import annotations

import pytest

from gateway.codecs import PixelDescription, choose_for_dataset, choose_transfer_syntax
from gateway.codecs.syntaxes import (
    DEFLATED_EXPLICIT_VR_LE,
    EXPLICIT_VR_BE,
    EXPLICIT_VR_LE,
    HTJ2K,
    HTJ2K_LOSSLESS,
    IMPLICIT_VR_LE,
    JPEG2000,
    JPEG2000_LOSSLESS,
    JPEG_BASELINE,
    JPEG_EXTENDED,
    JPEG_LS_LOSSLESS,
    RLE_LOSSLESS,
)
from tests.codecs.helpers import bundled

MPEG2 = "1.2.840.10008.1.2.4.100"
MONO8 = PixelDescription(64, 64, 1, 8, 8, 0, "MONOCHROME2")
MONO16 = PixelDescription(64, 64, 1, 16, 12, 1, "MONOCHROME2")
DOSE32 = PixelDescription(10, 10, 1, 32, 32, 0, "MONOCHROME2")


def test_stored_syntax_wins_when_accepted() -> None:
    accepted = [EXPLICIT_VR_LE, JPEG_LS_LOSSLESS]
    assert choose_transfer_syntax(JPEG_LS_LOSSLESS, accepted, False) == JPEG_LS_LOSSLESS


def test_stored_syntax_wins_even_if_we_cannot_decode_it() -> None:
    assert choose_transfer_syntax(MPEG2, [MPEG2], False) == MPEG2


@pytest.mark.parametrize(
    ("accepted", "expected"),
    [
        ([RLE_LOSSLESS, IMPLICIT_VR_LE, EXPLICIT_VR_LE], EXPLICIT_VR_LE),
        ([RLE_LOSSLESS, HTJ2K_LOSSLESS, IMPLICIT_VR_LE], IMPLICIT_VR_LE),
        ([RLE_LOSSLESS, HTJ2K_LOSSLESS, JPEG2000_LOSSLESS], JPEG2000_LOSSLESS),
        ([RLE_LOSSLESS, HTJ2K_LOSSLESS], HTJ2K_LOSSLESS),
        ([RLE_LOSSLESS, EXPLICIT_VR_BE], RLE_LOSSLESS),
        ([EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE], DEFLATED_EXPLICIT_VR_LE),
        ([EXPLICIT_VR_BE], EXPLICIT_VR_BE),
    ],
)
def test_lossless_preference_order(accepted: list[str], expected: str) -> None:
    assert choose_transfer_syntax(JPEG_LS_LOSSLESS, accepted, False) == expected


def test_reversible_codestreams_make_either_syntaxes_lossless_targets() -> None:
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [JPEG2000], False) == JPEG2000
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [HTJ2K, JPEG_BASELINE], False) == HTJ2K


def test_lossless_source_goes_lossy_only_when_allowed_and_nothing_else_fits() -> None:
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [JPEG_BASELINE], False) is None
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [JPEG_BASELINE], True) == JPEG_BASELINE
    both = [JPEG_BASELINE, RLE_LOSSLESS]
    assert choose_transfer_syntax(EXPLICIT_VR_LE, both, True) == RLE_LOSSLESS


def test_lossy_source_to_lossless_target_is_fine() -> None:
    assert choose_transfer_syntax(JPEG_BASELINE, [EXPLICIT_VR_LE], False) == EXPLICIT_VR_LE
    assert choose_transfer_syntax(JPEG_EXTENDED, [HTJ2K_LOSSLESS], False) == HTJ2K_LOSSLESS


def test_lossy_re_encoding_also_needs_permission() -> None:
    assert choose_transfer_syntax(JPEG_EXTENDED, [JPEG_BASELINE], False) is None


def test_impossible_cases_return_none() -> None:
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [JPEG_LS_LOSSLESS], True) is None
    assert choose_transfer_syntax(MPEG2, [EXPLICIT_VR_LE], True) is None
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [], True) is None


def test_pixel_format_limits_skip_targets() -> None:
    accepted = [RLE_LOSSLESS, HTJ2K_LOSSLESS]
    assert choose_transfer_syntax(EXPLICIT_VR_LE, accepted, desc=DOSE32) == HTJ2K_LOSSLESS
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [RLE_LOSSLESS], desc=DOSE32) is None
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [JPEG_BASELINE], True, desc=MONO16) is None
    assert (
        choose_transfer_syntax(EXPLICIT_VR_LE, [JPEG_BASELINE], True, desc=MONO8) == JPEG_BASELINE
    )


def test_native_to_native_ignores_pixel_limits() -> None:
    one_bit = PixelDescription(16, 16, 1, 1, 1, 0, "MONOCHROME2")
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [EXPLICIT_VR_BE], desc=one_bit) == EXPLICIT_VR_BE
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [RLE_LOSSLESS], desc=one_bit) is None


def test_non_pixel_instances_go_to_any_native_syntax_only() -> None:
    for target in (EXPLICIT_VR_LE, IMPLICIT_VR_LE, EXPLICIT_VR_BE, DEFLATED_EXPLICIT_VR_LE):
        assert (
            choose_transfer_syntax(JPEG_BASELINE, [target], False, has_pixel_data=False) == target
        )
    assert (
        choose_transfer_syntax(EXPLICIT_VR_LE, [RLE_LOSSLESS], True, has_pixel_data=False) is None
    )


def test_choose_for_dataset_reads_the_dataset() -> None:
    assert choose_for_dataset(bundled("rtplan.dcm"), [EXPLICIT_VR_BE]) == EXPLICIT_VR_BE
    assert choose_for_dataset(bundled("rtdose.dcm"), [RLE_LOSSLESS]) is None
    assert choose_for_dataset(bundled("CT_small.dcm"), [RLE_LOSSLESS]) == RLE_LOSSLESS
    assert (
        choose_for_dataset(bundled("SC_rgb_rle.dcm"), [JPEG_BASELINE], allow_lossy=True)
        == JPEG_BASELINE
    )


def test_a_peers_preferred_syntax_comes_before_the_stored_one_when_it_can_carry_the_instance() -> None:
    accepted = [EXPLICIT_VR_LE, JPEG2000_LOSSLESS, RLE_LOSSLESS, JPEG_BASELINE]
    prefer = (JPEG2000_LOSSLESS,)
    assert choose_transfer_syntax(EXPLICIT_VR_LE, accepted, False, desc=MONO16, preferred=prefer) == JPEG2000_LOSSLESS
    # Not accepted by the peer: the usual rule (the stored syntax).
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [EXPLICIT_VR_LE], False, desc=MONO16, preferred=prefer) == EXPLICIT_VR_LE
    # In the peer's own order, skipping what cannot carry it (32-bit dose never goes to RLE).
    assert choose_transfer_syntax(EXPLICIT_VR_LE, accepted, False, desc=DOSE32, preferred=(RLE_LOSSLESS,)) == EXPLICIT_VR_LE
    assert choose_transfer_syntax(EXPLICIT_VR_LE, accepted, False, desc=MONO16, preferred=(RLE_LOSSLESS, JPEG2000_LOSSLESS)) == RLE_LOSSLESS
    # A lossy preference only with allow_lossy.
    assert choose_transfer_syntax(EXPLICIT_VR_LE, accepted, False, desc=MONO8, preferred=(JPEG_BASELINE,)) == EXPLICIT_VR_LE
    assert choose_transfer_syntax(EXPLICIT_VR_LE, accepted, True, desc=MONO8, preferred=(JPEG_BASELINE,)) == JPEG_BASELINE
    # Without pixel data, a native preference is taken as is.
    assert choose_transfer_syntax(EXPLICIT_VR_LE, [EXPLICIT_VR_LE, IMPLICIT_VR_LE], False, has_pixel_data=False, preferred=(IMPLICIT_VR_LE,)) == IMPLICIT_VR_LE
