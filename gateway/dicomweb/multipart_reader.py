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
(each byte is searched once; the chunks are joined once, into the part), and a part
above the spill size goes to a file.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from gateway.spill import SpillArea, SpillWriter

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


class _Body:
    """A body as it arrives: the chunk being read and the position in it; what lies
    before the position is consumed. Only short things (a delimiter, part headers)
    may need more than one chunk at once: `extend` then joins the next chunk to the
    rest of this one. Part content is gathered chunk by chunk (`iter_parts`)."""

    def __init__(self, chunks: AsyncIterable[bytes], start: bytes) -> None:
        self._source = aiter(chunks)
        self.chunk = start
        self.pos = 0

    async def next_chunk(self) -> bytes | None:
        """The next chunk as it came, or None at the end of the body."""
        return await anext(self._source, None)

    async def extend(self) -> bool:
        """Join the next chunk to the rest of the current one; False at the end."""
        chunk = await anext(self._source, None)
        if chunk is None:
            return False
        self.chunk = self.chunk[self.pos :] + chunk
        self.pos = 0
        return True


def _content_length(headers: dict[str, str]) -> int | None:
    """A part's Content-Length header (archives such as Orthanc send one), if valid."""
    value = headers.get("content-length", "")
    return int(value) if value.isascii() and value.isdigit() else None


async def _declared_part(body: _Body, start: int, length: int, delimiter: bytes) -> bytes | None:
    """The content of a part that declares its ``length``, from ``start`` in the
    current chunk, taken without searching it for the delimiter: the delimiter must
    follow exactly there. Leaves the body at that delimiter. None when it does not
    follow (a wrong length, or the body ends first): the body then holds everything
    from the content's start in one chunk, to be searched as any part is."""
    chunk = body.chunk
    need = length + len(delimiter)
    if len(chunk) - start >= need:  # within the chunk: the usual case for small parts
        if chunk[start + length : start + need] == delimiter:
            body.pos = start + length
            return chunk[start : start + length]
        body.chunk, body.pos = chunk[start:], 0
        return None
    pieces = [memoryview(chunk)[start:]]
    held = len(chunk) - start
    while held < need:
        more = await body.next_chunk()
        if more is None:
            break
        pieces.append(memoryview(more))
        held += len(more)
    if held >= need:
        last = pieces[-1]
        at = len(last) - (held - length)  # where the content ends within the last chunk
        if at >= 0 and last[at : at + len(delimiter)] == delimiter:
            body.chunk, body.pos = cast(bytes, last.obj), at
            pieces[-1] = last[:at]
            return b"".join(pieces)
    body.chunk, body.pos = b"".join(pieces), 0
    return None


def _too_long(max_part: int) -> str:
    return f"a part is longer than {max_part // (1024 * 1024)} MiB" if max_part >= 1 << 20 else f"a part is longer than {max_part} bytes"


def _trim(pieces: list[memoryview], count: int) -> None:
    """Drop the last ``count`` bytes of the content held in ``pieces``."""
    while count:
        last = pieces[-1]
        if len(last) <= count:
            count -= len(last)
            pieces.pop()
        else:
            pieces[-1] = last[: len(last) - count]
            count = 0


async def iter_parts(
    chunks: AsyncIterable[bytes], boundary: str, spill_area: SpillArea, spill_bytes: int, max_part: int | None = None
) -> AsyncIterable[StreamedPart]:
    """Every part of a body arriving as ``chunks``, each as soon as it is complete.

    Memory holds at most one part below ``spill_bytes`` plus one chunk; a larger part
    is written to a file under ``spill_area`` as it arrives. A part longer than
    ``max_part`` (declared or as it arrives) raises MultipartError: the bound of a
    reader that never spills (frames are handed on as bytes). A part's content is the
    chunks it arrived in, joined once when its delimiter is found (each byte is
    searched once, and copied once); a delimiter split across chunks is found in the
    few bytes either side of their seam. A body that ends before its close delimiter
    raises MultipartError after the complete parts were handed out.
    """
    # A leading CRLF makes the first delimiter look like every later one.
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    seam = len(delimiter) - 1  # bytes either side of a seam a split delimiter can span
    body = _Body(chunks, b"\r\n")
    spill: SpillWriter | None = None
    try:
        # the preamble, up to the first delimiter
        while (found := body.chunk.find(delimiter, body.pos)) < 0:
            if len(body.chunk) - body.pos > _EDGE or not await body.extend():
                raise MultipartError("first boundary not found")
        body.pos = found
        while True:
            # at a delimiter: the close delimiter, or a part's headers
            while True:
                chunk, pos = body.chunk, body.pos
                after = pos + len(delimiter)
                if len(chunk) >= after + 2 and (chunk[after : after + 2] == b"--" or chunk.find(b"\r\n\r\n", after) >= 0):
                    break
                if len(chunk) - pos > _EDGE:
                    raise MultipartError("part headers not terminated")
                if not await body.extend():
                    raise MultipartError("body ends inside part headers")
            if chunk[after : after + 2] == b"--":
                return
            line_end = chunk.find(b"\r\n", after)
            headers_end = chunk.find(b"\r\n\r\n", line_end)
            headers = _headers(bytes(chunk[line_end + 2 : headers_end]))
            start = headers_end + 4
            declared = _content_length(headers)
            if max_part is not None and declared is not None and declared > max_part:
                raise MultipartError(_too_long(max_part))
            if declared is not None and declared <= spill_bytes:
                data = await _declared_part(body, start, declared, delimiter)
                if data is not None:
                    yield StreamedPart(headers, data, None, declared)
                    continue
                chunk, start = body.chunk, 0  # the length was wrong: search instead
            # the content, up to the next delimiter
            end = chunk.find(delimiter, start)
            if end >= 0:  # within the chunk the headers came in
                if max_part is not None and end - start > max_part:
                    raise MultipartError(_too_long(max_part))
                body.pos = end
                data = chunk[start:end]
                yield StreamedPart(headers, data, None, len(data))
                continue
            pieces = [memoryview(chunk)[start:]]
            held = len(chunk) - start
            tail = bytes(chunk[max(start, len(chunk) - seam) :])  # the content's last bytes
            while True:
                if spill is None and held > spill_bytes:
                    spill = spill_area.writer(".part")
                if spill is not None:
                    for piece in pieces:
                        spill.write(piece)
                    pieces.clear()
                arrived = await body.next_chunk()
                if arrived is None:
                    raise MultipartError("body ends inside a part")
                chunk = arrived
                split = (tail + chunk[:seam]).find(delimiter)
                if split >= 0:  # the delimiter began in the content held already
                    if spill is not None:
                        spill.truncate(spill.length - (len(tail) - split))
                    else:
                        _trim(pieces, len(tail) - split)
                    body.chunk, body.pos = tail[split:] + chunk, 0
                    break
                end = chunk.find(delimiter)
                if end >= 0:
                    pieces.append(memoryview(chunk)[:end])
                    body.chunk, body.pos = chunk, end
                    break
                pieces.append(memoryview(chunk))
                held += len(chunk)
                # (what is held may end in the first bytes of the delimiter)
                if max_part is not None and held - seam > max_part:
                    raise MultipartError(_too_long(max_part))
                tail = (tail + chunk[-seam:])[-seam:]
            if spill is None:
                data = b"".join(pieces)
                pieces.clear()
                if max_part is not None and len(data) > max_part:
                    raise MultipartError(_too_long(max_part))
                yield StreamedPart(headers, data, None, len(data))
            else:
                for piece in pieces:
                    spill.write(piece)
                pieces.clear()
                done, spill = spill, None
                yield StreamedPart(headers, None, done.close(), done.length)
    finally:
        if spill is not None:
            spill.discard()
