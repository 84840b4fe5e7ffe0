"""Which Accept-Encoding values admit gzip (RFC 9110 12.5.3)."""

from __future__ import annotations

import pytest

from gateway.web.compression import accepts_gzip


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("gzip, deflate, br, zstd", True),  # Chromium
        ("gzip, deflate", True),  # python-requests (dicomweb-client)
        ("deflate, gzip;q=1.0, *;q=0.5", True),  # curl --compressed
        ("GZIP;Q=0.3", True),
        ("*", True),
        ("br, *;q=0.1", True),
        (None, False),
        ("", False),
        ("identity", False),
        ("br", False),
        ("gzip;q=0", False),
        ("*;q=0.5, gzip;q=0", False),
        ("gzip;q=nonsense", False),
    ],
)
def test_accepts_gzip(header: str | None, expected: bool) -> None:
    assert accepts_gzip(header) is expected
