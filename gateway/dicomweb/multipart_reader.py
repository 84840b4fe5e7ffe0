"""Reading ``multipart/related`` WADO-RS answers (PS3.18 8.6.1.2).

A WADO-RS instance answer is one part holding a Part 10 file. The body is received
whole (in memory, or in a spill file when it is large) and the part is then located
by searching for the boundary with ``bytes.find``, which is C speed; a chunk-by-chunk
parser in Python would cost more than the network on loopback. For a spilled body
only its head and tail are read: the part is everything between the first
delimiter's headers and the close delimiter, so it is never copied again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# Headers of one part never come near this; the close delimiter is at the very end.
_EDGE = 64 * 1024


class MultipartError(ValueError):
    """The body is not the multipart/related answer its Content-Type announced."""


@dataclass(frozen=True)
class PartSpan:
    """Where one part's content lies in the body: ``[offset, offset + length)``."""

    headers: dict[str, str]
    offset: int
    length: int


def boundary_of(content_type: str) -> str:
    """The boundary parameter of a multipart Content-Type."""
    match = _BOUNDARY_RE.search(content_type)
    if not match:
        raise MultipartError("multipart Content-Type without a boundary")
    return match.group(1) or match.group(2)


def _headers(block: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip()
    return out


def _first_part_start(head: bytes, boundary: bytes) -> tuple[dict[str, str], int]:
    """Headers of the first part and where its content starts."""
    delimiter = b"--" + boundary
    start = head.find(delimiter)
    if start < 0:
        raise MultipartError("first boundary not found")
    line_end = head.find(b"\r\n", start)
    if line_end < 0:
        raise MultipartError("first boundary line not terminated")
    if head[start + len(delimiter) : start + len(delimiter) + 2] == b"--":
        raise MultipartError("multipart body without parts")
    headers_end = head.find(b"\r\n\r\n", line_end)
    if headers_end >= 0:
        return _headers(head[line_end + 2 : headers_end]), headers_end + 4
    if head[line_end + 2 : line_end + 4] == b"\r\n":
        return {}, line_end + 4  # a part without headers
    raise MultipartError("part headers not terminated")


def split_parts(body: bytes | memoryview, boundary: str) -> list[PartSpan]:
    """Every part of an in-memory body, in order."""
    data = bytes(body) if isinstance(body, memoryview) else body
    marker = b"\r\n--" + boundary.encode("latin-1")
    spans: list[PartSpan] = []
    headers, start = _first_part_start(data[:_EDGE], boundary.encode("latin-1"))
    while True:
        end = data.find(marker, start)
        if end < 0:
            raise MultipartError("part not terminated by a boundary")
        spans.append(PartSpan(headers, start, end - start))
        after = end + len(marker)
        if data[after : after + 2] == b"--":
            return spans
        headers_end = data.find(b"\r\n\r\n", after)
        if headers_end < 0:
            raise MultipartError("part headers not terminated")
        headers, start = _headers(data[after + 2 : headers_end]), headers_end + 4


def single_part_in_file(path: Path, boundary: str) -> PartSpan:
    """The one part of a body spilled to ``path``, reading only its head and tail."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(min(_EDGE, size))
        tail_start = max(0, size - _EDGE)
        fh.seek(tail_start)
        tail = fh.read()
    headers, start = _first_part_start(head, boundary.encode("latin-1"))
    close = b"\r\n--" + boundary.encode("latin-1") + b"--"
    end = tail.rfind(close)
    if end < 0:
        raise MultipartError("close delimiter not found at the end of the body")
    end += tail_start
    if end < start:
        raise MultipartError("close delimiter before the part content")
    return PartSpan(headers, start, end - start)

