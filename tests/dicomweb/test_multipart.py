"""Unit tests of the WADO-RS multipart reader: one part in memory or in a file, and
a stream cut anywhere across chunks, spilled above a size, or cut short."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.dicomweb.multipart_reader import (
    MultipartError,
    StreamedPart,
    boundary_of,
    iter_parts,
    single_part_in_file,
    split_parts,
)
from gateway.spill import SpillArea


def test_multipart_single_part_in_memory_and_in_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    content_type = 'multipart/related; type="application/dicom"; boundary="b0und"'
    payload = b"DICM\r\n--not-it\r\n" * 100
    body = b"--b0und\r\nContent-Type: application/dicom\r\n\r\n" + payload + b"\r\n--b0und--\r\n"
    boundary = boundary_of(content_type)
    [span] = split_parts(body, boundary)
    assert body[span.offset : span.offset + span.length] == payload
    assert span.headers["content-type"] == "application/dicom"
    path = tmp_path / "body"
    path.write_bytes(body)
    in_file = single_part_in_file(path, boundary)
    assert (in_file.offset, in_file.length) == (span.offset, span.length)
    with pytest.raises(MultipartError):
        split_parts(b"--b0und\r\n\r\nunterminated", boundary)


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def _stream(
    body: bytes, size: int, spill_dir: Path, spill_bytes: int, max_part: int | None = None
) -> tuple[list[StreamedPart], Exception | None]:
    async def collect() -> tuple[list[StreamedPart], Exception | None]:
        parts: list[StreamedPart] = []
        try:
            async for part in iter_parts(_chunks(body, size), "b0und", SpillArea(spill_dir), spill_bytes, max_part):
                parts.append(part)
        except MultipartError as exc:
            return parts, exc
        return parts, None

    return asyncio.run(collect())


def test_multipart_stream_hands_out_every_part_whatever_the_chunking(tmp_path: Path) -> None:
    """Parts split anywhere across chunks, near-delimiters inside the content, a part
    without headers, and one part above the spill size, which arrives as a file."""
    contents = [b"A" * 50 + b"\r\n--b0un" + b"--b0und" + b"B" * 30, b"small", bytes(range(256)) * 3]
    body = b"preamble\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\n" + contents[0]
    body += b"\r\n--b0und\r\n\r\n" + contents[1]
    body += b"\r\n--b0und\r\nContent-Type: application/dicom\r\n\r\n" + contents[2] + b"\r\n--b0und--\r\n"
    for size in (1, 2, 5, 13, 64, 700, len(body)):
        spill_dir = tmp_path / f"spill-{size}"
        parts, error = _stream(body, size, spill_dir, 500)
        assert error is None
        got = [p.data if p.data is not None else p.path.read_bytes() for p in parts]  # type: ignore[union-attr]
        assert got == contents, size
        assert [p.length for p in parts] == [len(c) for c in contents]
        # a part that arrived within one chunk is in memory already: no point spilling it
        assert [p.path is not None for p in parts] == [False, False, size < 500], size
        assert parts[0].headers == {"content-type": "application/dicom"} and parts[1].headers == {}


def test_multipart_stream_cut_short_keeps_complete_parts_and_no_spill_file(tmp_path: Path) -> None:
    body = b"--b0und\r\n\r\nfirst\r\n--b0und\r\n\r\n" + b"x" * 2000
    parts, error = _stream(body, 100, tmp_path, 500)
    assert [p.data for p in parts] == [b"first"]
    assert isinstance(error, MultipartError)
    assert list(tmp_path.iterdir()) == []  # the half-received large part was deleted
    assert _stream(b"no delimiter at all", 4, tmp_path, 500)[1] is not None


def test_multipart_stream_takes_declared_lengths_and_survives_wrong_ones(tmp_path: Path) -> None:
    """Parts that declare their Content-Length (Orthanc's do) are taken by that length;
    a length that is wrong (short, long, past the end of the body) or not a number
    falls back to the search for the delimiter, with the same parts handed out."""
    contents = [b"A" * 50 + b"\r\n--b0un" + b"B" * 30, b"", bytes(range(256)) * 3, b"tail"]
    for declared in (
        [str(len(c)) for c in contents],
        [str(len(contents[0]) - 3), "5", str(len(contents[2]) + 9), "10000"],
        ["x1", "-1", " 7", str(len(contents[3]))],
    ):
        body = b"".join(
            b"\r\n--b0und\r\nContent-Length: " + length.encode() + b"\r\n\r\n" + content
            for content, length in zip(contents, declared)
        ) + b"\r\n--b0und--\r\n"
        for size in (1, 3, 40, 64, 700, len(body)):
            parts, error = _stream(body, size, tmp_path / f"spill-{size}", 10_000)
            assert error is None, (declared, size)
            assert [p.data for p in parts] == contents, (declared, size)
            assert [p.length for p in parts] == [len(c) for c in contents]


def test_multipart_stream_refuses_a_part_past_max_part(tmp_path: Path) -> None:
    """A reader that never spills (frames) stops at ``max_part``: a part that grows
    past it as it arrives, or declares more, ends the stream after the parts before."""
    body = b"--b0und\r\n\r\nfirst\r\n--b0und\r\n\r\n" + b"x" * 5000 + b"\r\n--b0und--\r\n"
    declared = b"--b0und\r\n\r\nfirst\r\n--b0und\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000 + b"\r\n--b0und--\r\n"
    for whole in (body, declared):
        for size in (7, 100, len(whole)):
            parts, error = _stream(whole, size, tmp_path, 10**9, max_part=1000)
            assert [p.data for p in parts] == [b"first"], size
            assert isinstance(error, MultipartError) and "longer than 1000 bytes" in str(error)
            parts, error = _stream(whole, size, tmp_path, 10**9, max_part=5000)
            assert error is None and [p.length for p in parts] == [5, 5000]
