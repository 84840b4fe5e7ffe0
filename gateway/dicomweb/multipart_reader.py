"""Reading ``multipart/related`` WADO-RS answers (PS3.18 8.6.1.2).

A WADO-RS instance answer is one part holding a Part 10 file. The body is received
whole (in memory, or in a spill file when it is large) and the part is then located
by searching for the boundary with ``bytes.find``, which is C speed; a chunk-by-chunk
parser in Python would cost more than the network on loopback. For a spilled body
only its head and tail are read: the part is everything between the first
delimiter's headers and the close delimiter, so it is never copied again.

A series or study answer holds one part per instance and may be gigabytes, so
`iter_parts` reads it as a stream: each part is handed out as soon as its closing
delimiter arrives, found with the same ``bytes.find`` over the received chunks
(each byte is searched once), and a part above the spill size goes to a file.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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



@dataclass(frozen=True)
class StreamedPart:
    """One part of a streamed body: its content in ``data``, or in the temporary file
    ``path`` (the receiver's to delete) when it was larger than the spill size."""

    headers: dict[str, str]
    data: bytes | None
    path: Path | None
    length: int


class _Spill:
    """The file a large part's content goes to while its end is awaited."""

    def __init__(self, spill_dir: Path) -> None:
        spill_dir.mkdir(parents=True, exist_ok=True)
        self.path = spill_dir / f"{uuid.uuid4().hex}.part"
        self.fh: BinaryIO = open(self.path, "wb")  # noqa: SIM115 - closed in finish/discard
        self.length = 0

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.fh.write(data)
        self.length += len(data)

    def finish(self) -> Path:
        self.fh.close()
        return self.path

    def discard(self) -> None:
        self.fh.close()
        self.path.unlink(missing_ok=True)


async def iter_parts(chunks: AsyncIterable[bytes], boundary: str, spill_dir: Path, spill_bytes: int) -> AsyncIterable[StreamedPart]:
    """Every part of a body arriving as ``chunks``, each as soon as it is complete.

    Memory holds at most one part below ``spill_bytes`` plus one chunk; a larger part
    is written to a file under ``spill_dir`` as it arrives. A body that ends before its
    close delimiter raises MultipartError after the complete parts were handed out.
    """
    # A leading CRLF makes the first delimiter look like every later one.
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    keep = len(delimiter) + 1  # bytes that may hold the start of a split delimiter
    buf = bytearray(b"\r\n")
    source = aiter(chunks)
    spill: _Spill | None = None

    async def more() -> bool:
        chunk = await anext(source, None)
        if chunk is None:
            return False
        buf.extend(chunk)
        return True

    try:
        # the preamble, up to the first delimiter
        while (pos := buf.find(delimiter)) < 0:
            if len(buf) > _EDGE:
                raise MultipartError("first boundary not found")
            if not await more():
                raise MultipartError("first boundary not found")
        del buf[:pos]
        while True:
            # buf starts with a delimiter: the close delimiter, or a part's headers
            while len(buf) < len(delimiter) + 2 or (buf[len(delimiter) : len(delimiter) + 2] != b"--" and buf.find(b"\r\n\r\n", len(delimiter)) < 0):
                if len(buf) > _EDGE:
                    raise MultipartError("part headers not terminated")
                if not await more():
                    raise MultipartError("body ends inside part headers")
            if buf[len(delimiter) : len(delimiter) + 2] == b"--":
                return
            line_end = buf.find(b"\r\n", len(delimiter))
            headers_end = buf.find(b"\r\n\r\n", line_end)
            headers = _headers(bytes(buf[line_end + 2 : headers_end]))
            del buf[: headers_end + 4]
            # the content, up to the next delimiter
            searched = 0
            while (end := buf.find(delimiter, searched)) < 0:
                searched = max(0, len(buf) - keep)
                if spill is None and len(buf) > spill_bytes:
                    spill = _Spill(spill_dir)
                if spill is not None and searched > 0:
                    with memoryview(buf) as view:
                        spill.write(view[:searched])
                    del buf[:searched]
                    searched = 0
                if not await more():
                    raise MultipartError("body ends inside a part")
            if spill is None:
                with memoryview(buf) as view:
                    data = bytes(view[:end])
                del buf[:end]
                yield StreamedPart(headers, data, None, len(data))
            else:
                with memoryview(buf) as view:
                    spill.write(view[:end])
                del buf[:end]
                done, spill = spill, None
                yield StreamedPart(headers, None, done.finish(), done.length)
    finally:
        if spill is not None:
            spill.discard()
