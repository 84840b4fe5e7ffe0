"""The ``accept`` query parameter joined to the Accept header (PS3.18 8.3.3.1, 8.7.5)."""

from __future__ import annotations

from gateway.dicomweb.accept import parse_accept, with_query


def test_query_media_types_come_first_where_the_header_admits_them() -> None:
    assert with_query("*/*", ["image/png"]) == "image/png, */*"
    assert with_query("image/*, application/json;q=0.5", ["image/png,image/gif;q=0.3", "text/html"]) == (
        "image/png, image/gif;q=0.3, image/*, application/json;q=0.5"
    )
    assert [r.media for r in parse_accept(with_query("image/*", ["image/gif;q=0.3", "image/png"]))] == [
        "image/png", "image/*", "image/gif",
    ]


def test_a_query_the_header_does_not_admit_is_ignored() -> None:
    assert with_query("image/jpeg", ["image/png"]) == "image/jpeg"
    assert with_query("image/jpeg", []) == "image/jpeg"
    assert with_query(None, []) is None


def test_without_a_header_the_query_alone_is_asked() -> None:
    assert with_query(None, ['multipart/related; type="application/dicom+xml"']) == 'multipart/related; type="application/dicom+xml"'
    assert with_query("", ["image/png"]) == "image/png"
