"""Streaming ``multipart/related`` bodies built from files on disk.

A STOW-RS request of 32 CT slices is tens of megabytes; it is streamed from the spool
files chunk by chunk (reads in an executor thread), with an exact Content-Length so
that archives which refuse chunked uploads accept it.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

CHUNK = 1 << 20


def new_boundary() -> str:
    return f"dicomgw-{secrets.token_hex(16)}"


class FileMultipart:
    """A multipart/related body whose parts are whole files of one media type."""

    def __init__(self, files: Sequence[tuple[Path, int]], part_type: str, blank_head: int = 0) -> None:
        """``blank_head``: the first bytes of each file sent as zeros instead, for files
        whose start is the writer's own business (the spool's record preamble)."""
        self.files = list(files)
        self.part_type = part_type
        self.blank_head = blank_head
        self.boundary = new_boundary()
        self._head = f"--{self.boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode("ascii")
        self._tail = f"--{self.boundary}--\r\n".encode("ascii")

    @property
    def content_length(self) -> int:
        per_part = len(self._head) + 2
        return sum(size + per_part for _, size in self.files) + len(self._tail)

    def _layout(self) -> Iterator[bytes | tuple[Path, int, int]]:
        """The body in order: literal bytes (part headers, blanked heads, CRLFs, the
        close delimiter) and ``(path, offset, size)`` for each file's content."""
        for path, size in self.files:
            yield self._head
            head = min(self.blank_head, size)
            if head:
                yield bytes(head)
            yield path, head, size - head
            yield b"\r\n"
        yield self._tail

    async def __aiter__(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        for piece in self._layout():
            if isinstance(piece, bytes):
                yield piece
                continue
            path, offset, size = piece
            with open(path, "rb") as fh:
                fh.seek(offset)
                sent = 0
                while sent < size:
                    chunk = await loop.run_in_executor(None, fh.read, min(CHUNK, size - sent))
                    if not chunk:
                        raise OSError(f"spool file {path.name} is shorter than recorded")
                    sent += len(chunk)
                    yield chunk

    def sha256(self) -> str:
        """The hex SHA-256 of the body exactly as iterating it sends it, for signers that
        sign the payload (AWS SigV4). Blocking: it reads every file, so the files are read
        twice (the second time mostly from the page cache)."""
        digest = hashlib.sha256()
        for piece in self._layout():
            if isinstance(piece, bytes):
                digest.update(piece)
                continue
            path, offset, size = piece
            with open(path, "rb") as fh:
                fh.seek(offset)
                left = size
                while left:
                    chunk = fh.read(min(CHUNK, left))
                    if not chunk:
                        raise OSError(f"spool file {path.name} is shorter than recorded")
                    digest.update(chunk)
                    left -= len(chunk)
        return digest.hexdigest()
