"""Whole numbers in request parameters."""

from __future__ import annotations

from gateway.dicomweb.params import MAX_DIGITS, whole_number


def test_only_short_ascii_digit_strings_are_whole_numbers() -> None:
    assert whole_number("12") == 12 and whole_number(" 7 ") == 7 and whole_number("0") == 0
    assert whole_number("9" * MAX_DIGITS) == int("9" * MAX_DIGITS)
    # 5000 nines fit in a request line; int() refuses more than 4300 digits with ValueError
    for text in ("", "-1", "1.5", "1e3", "\u0661", "9" * (MAX_DIGITS + 1), "9" * 5000, "nan"):
        assert whole_number(text) is None, text
