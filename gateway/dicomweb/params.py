"""Whole numbers in request parameters: frame numbers, limits, sizes.

``str.isdigit`` admits any Unicode digit and any length, and Python refuses to turn a
string of more than 4300 digits into an int (ValueError): a query parameter of 5000
nines, which fits in a request line, made that a 500. Here a number is ASCII digits,
at most 18 of them (any larger count or size is meaningless, and it stays an int64).
"""

from __future__ import annotations

MAX_DIGITS = 18


def whole_number(text: str) -> int | None:
    """``text`` as a non-negative whole number, or None when it is not one."""
    text = text.strip()
    if not text or len(text) > MAX_DIGITS or not text.isascii() or not text.isdigit():
        return None
    return int(text)
