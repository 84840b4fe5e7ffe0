"""One accepted DICOM association, served on the asyncio loop (PS3.8 acceptor role).

Reads PDUs, reassembles DIMSE messages and hands each one to the service registered
for its command. A C-STORE data set is streamed straight into a file in the spool's
``incoming/`` directory as its fragments arrive (preamble, file meta, then the bytes
exactly as received), so an instance of any size costs no memory. Services run as
tasks so the reader keeps reading: that is how a C-CANCEL reaches a running C-FIND.

Any protocol violation (bad PDU, bad command, fragments out of order) aborts the
association with a log line; it never takes the process down. A spool short of space
is not a protocol matter: free space is checked at the C-STORE-RQ and every few MB of
the data set, and a failed write (ENOSPC, EIO) stops the file; the rest of that data
set is then read and dropped and the C-STORE is answered 0xA700, so the association
carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import shutil
import struct
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gateway.dimse import pdu
from gateway.writeback import start_writeback
from gateway.dimse.command import (
    C_CANCEL_RQ,
    C_STORE_RQ,
    Command,
    CommandError,
    decode_command,
)

log = logging.getLogger("gateway.dimse")

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.60826662343822680984516461294576239553"
IMPLEMENTATION_VERSION_NAME = "DICOMGW_010"
MAX_NON_STORE_DATASET = 4 * 1024 * 1024  # identifiers of C-FIND/MOVE/GET are small
WRITEBACK_CHUNK = 256 * 1024
SPACE_CHECK_BYTES = 4 * 1024 * 1024  # free space is checked again after this much of a data set


class ProtocolError(Exception):
    """The peer broke the upper layer or DIMSE protocol; the association is aborted."""


@dataclass(frozen=True)
class AcceptedContext:
    id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class Message:
    """A complete DIMSE request: the command and, if any, its data set."""

    context: AcceptedContext
    command: Command
    dataset_path: Path | None = None  # C-STORE: Part 10 file as received
    dataset: bytes | None = None  # other services: the encoded data set
    refused: str | None = None  # C-STORE not stored (spool full, write error): why


@dataclass
class AssociationStats:
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    failed: int = 0
    echoed: int = 0
    other: int = 0


class Association:
    """State of one association and the means to answer on it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rq: pdu.AssociateRQ,
        contexts: dict[int, AcceptedContext],
        incoming_dir: Path,
        min_free_bytes: int = 0,
    ) -> None:
        """``min_free_bytes``: below this free space on ``incoming_dir``'s file system a
        C-STORE data set is not written (``spool.min_free_mb``)."""
        self.reader = reader
        self.writer = writer
        self.rq = rq
        self.calling_ae = rq.calling_ae
        self.called_ae = rq.called_ae
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{rq.calling_ae}@{peer[0]}:{peer[1]}"
        self.contexts = contexts
        self.peer_max_pdu = rq.max_pdu_length
        self.incoming_dir = incoming_dir
        self.min_free_bytes = min_free_bytes
        self.stats = AssociationStats()
        self._send_lock = asyncio.Lock()
        # message reassembly
        self._command_buf = bytearray()
        self._pending: Message | None = None
        self._sink: BinaryIO | None = None
        self._sink_path: Path | None = None
        self._flushed = 0  # bytes of the store file already handed to writeback
        self._space_checked = 0  # bytes of the store file at the last free-space check
        self._refused: str | None = None  # the C-STORE arriving is not being stored: why
        # running services, by message id, so C-CANCEL can reach them
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._last_task: asyncio.Task[None] | None = None
        # C-GET: SOP classes for which the peer took the SCP role (we send C-STORE to
        # it), and the C-STORE-RSPs our sub-operations await, by message id.
        self.scp_roles: frozenset[str] = frozenset()
        self._responses: dict[int, asyncio.Future[Command]] = {}
        self._message_id = 0

    # ---- sending --------------------------------------------------------------

    async def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """Send one DIMSE message, fragmented to the peer's maximum PDU length."""
        pdus = pdu.encode_pdata(context_id, command, True, self.peer_max_pdu)
        if dataset is not None:
            pdus += pdu.encode_pdata(context_id, dataset, False, self.peer_max_pdu)
        async with self._send_lock:
            for item in pdus:
                self.writer.write(item)
            await self.writer.drain()

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            self.writer.write(data)
            await self.writer.drain()

    # ---- receiving --------------------------------------------------------------

    def on_pdata(self, body: bytes) -> list[Message]:
        """Consume one P-DATA-TF; return the messages it completed."""
        done: list[Message] = []
        for context_id, control, fragment in pdu.parse_pdata(body):
            is_command, last = bool(control & 1), bool(control & 2)
            context = self.contexts.get(context_id)
            if context is None:
                raise ProtocolError(f"fragment on presentation context {context_id}, which was not accepted")
            if is_command:
                if self._pending is not None:
                    raise ProtocolError("command fragment while a data set was still arriving")
                self._command_buf += fragment
                if last:
                    message = self._start_message(context)
                    if message is not None:
                        done.append(message)
            else:
                message = self._pending
                if message is None:
                    raise ProtocolError("data set fragment without a command")
                if message.context.id != context_id:
                    raise ProtocolError("data set fragment on a different presentation context")
                self._write_data(fragment)
                if last:
                    done.append(self._finish_dataset())
        return done

    def _start_message(self, context: AcceptedContext) -> Message | None:
        try:
            command = decode_command(bytes(self._command_buf))
        except CommandError as exc:
            raise ProtocolError(f"undecodable command set: {exc}") from exc
        self._command_buf.clear()
        message = Message(context=context, command=command)
        if not command.has_dataset:
            return message
        self._pending = message
        if command.field == C_STORE_RQ:
            self._open_store_file(message)
        else:
            self._sink = io.BytesIO()
        return None

    def _open_store_file(self, message: Message) -> None:
        """Start the Part 10 file: preamble and file meta, then the data set as received.

        Below the free-space floor no file is opened: the data set is swallowed and
        the C-STORE refused, so an instance never fills the disk from the start.
        """
        self._flushed = self._space_checked = 0
        problem = self._space_problem()
        if problem is not None:
            self._refuse(problem)
            return
        path = self.incoming_dir / f"{uuid.uuid4().hex}.part"
        header = file_meta_header(
            str(message.command.get(0x0002, "")),
            str(message.command.get(0x1000, "")),
            message.context.transfer_syntax,
            self.calling_ae,
        )
        try:
            fh = open(path, "wb")  # noqa: SIM115 - closed in _finish_dataset, _refuse or discard()
        except OSError as exc:
            self._refuse(_write_problem(exc))
            return
        self._sink, self._sink_path = fh, path
        try:
            fh.write(header)
        except OSError as exc:
            self._refuse(_write_problem(exc))

    def _space_problem(self) -> str | None:
        """Why the spool cannot take more data now (free space below the floor), or None."""
        try:
            free = shutil.disk_usage(self.incoming_dir).free
        except OSError as exc:
            return f"spool unusable: {exc.strerror}"
        if free < self.min_free_bytes:
            return (
                f"spool free space {free // 2**20} MiB is below the floor of "
                f"{self.min_free_bytes // 2**20} MiB"
            )
        return None

    def _refuse(self, reason: str) -> None:
        """Stop storing the C-STORE in progress: drop its partial file; its remaining
        fragments are read and discarded, and the C-STORE is answered with ``reason``."""
        if self._sink is not None:
            with contextlib.suppress(OSError):
                self._sink.close()
        if self._sink_path is not None:
            with contextlib.suppress(OSError):
                self._sink_path.unlink(missing_ok=True)
        self._sink, self._sink_path, self._refused = None, None, reason

    def _write_data(self, fragment: memoryview) -> None:
        if self._refused is not None:
            return  # the rest of a refused C-STORE data set
        sink = self._sink
        assert sink is not None
        if self._sink_path is None:
            if sink.tell() + len(fragment) > MAX_NON_STORE_DATASET:
                raise ProtocolError("identifier larger than the limit for query/retrieve requests")
            sink.write(fragment)
            return
        try:
            sink.write(fragment)
            written = sink.tell()
            if written - self._flushed >= WRITEBACK_CHUNK:
                sink.flush()
                start_writeback(sink.fileno(), self._flushed, written - self._flushed)
                self._flushed = written
        except OSError as exc:
            self._refuse(_write_problem(exc))
            return
        if written - self._space_checked >= SPACE_CHECK_BYTES:
            self._space_checked = written
            problem = self._space_problem()
            if problem is not None:
                self._refuse(problem)

    def _finish_dataset(self) -> Message:
        message = self._pending
        assert message is not None
        if self._refused is None and self._sink_path is not None:
            assert self._sink is not None
            try:
                self._sink.close()  # flushes the buffered tail, which can hit ENOSPC too
            except OSError as exc:
                self._refuse(_write_problem(exc))
            else:
                message.dataset_path = self._sink_path
        elif self._refused is None:
            message.dataset = self._sink.getvalue()  # type: ignore[union-attr]
        message.refused = self._refused
        self._pending, self._sink, self._sink_path, self._refused = None, None, None, None
        return message

    def discard(self) -> None:
        """Drop a half-received data set (abort, timeout, protocol error)."""
        if self._sink is not None:
            with contextlib.suppress(OSError):
                self._sink.close()
        if self._sink_path is not None:
            self._sink_path.unlink(missing_ok=True)
        self._pending, self._sink, self._sink_path, self._refused = None, None, None, None

    # ---- services -----------------------------------------------------------------

    def dispatch(self, message: Message, handler: Callable[[Association, Message], Awaitable[None]]) -> None:
        """Run a service for a message; requests are served in order, one at a time."""
        previous = self._last_task

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(BaseException):
                    await previous
            try:
                await handler(self, message)
            finally:
                if message.dataset_path is not None:
                    message.dataset_path.unlink(missing_ok=True)
                self.tasks.pop(message.command.message_id, None)

        task = asyncio.create_task(run())
        self.tasks[message.command.message_id] = task
        self._last_task = task

    def next_message_id(self) -> int:
        """A message id for a request we send on this association (C-GET sub-operations)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def expect_response(self, message_id: int) -> asyncio.Future[Command]:
        """A future the reader resolves with the response to our request ``message_id``."""
        future: asyncio.Future[Command] = asyncio.get_running_loop().create_future()
        self._responses[message_id] = future
        future.add_done_callback(lambda _: self._responses.pop(message_id, None))
        return future

    def deliver_response(self, message: Message) -> None:
        """Hand a response command to the request awaiting it."""
        target = message.command.get(0x0120)
        future = self._responses.get(int(target)) if target is not None else None  # type: ignore[arg-type]
        if future is None:
            raise ProtocolError(f"response 0x{message.command.field:04x} to no request of ours")
        if not future.done():
            future.set_result(message.command)

    def cancel(self, message: Message) -> None:
        """C-CANCEL-RQ: cancel the running request it names (if still running)."""
        target = message.command.get(0x0120)
        task = self.tasks.get(int(target)) if target is not None else None  # type: ignore[arg-type]
        if task is not None and not task.done():
            task.cancel()

    async def drain_tasks(self) -> None:
        if self._last_task is not None:
            with contextlib.suppress(BaseException):
                await self._last_task


def _write_problem(exc: OSError) -> str:
    """A C-STORE refusal reason for a failed write of its file."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"spool disk full: {exc.strerror}"
    return f"spool write error: {exc.strerror}"


def _meta_element(element: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta_header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1).

    Encoded directly: it is written once per received instance, and a general data
    set writer costs more than the rest of the receive path together.
    """
    body = b"".join(
        [
            _meta_element(0x0001, b"OB", b"\x00\x01", b"\x00"),
            _meta_element(0x0002, b"UI", sop_class.encode("ascii", "replace"), b"\x00"),
            _meta_element(0x0003, b"UI", sop_instance.encode("ascii", "replace"), b"\x00"),
            _meta_element(0x0010, b"UI", transfer_syntax.encode("ascii"), b"\x00"),
            _meta_element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID.encode(), b"\x00"),
            _meta_element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME.encode(), b" "),
            _meta_element(0x0016, b"AE", source_ae.encode("ascii", "replace")[:16], b" "),
        ]
    )
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


async def read_pdu(reader: asyncio.StreamReader, timeout: float, max_length: int) -> tuple[int, bytes]:
    """Read one PDU; enforce the timeout and our announced maximum length."""
    async with asyncio.timeout(timeout):
        header = await reader.readexactly(6)
        pdu_type, _, length = struct.unpack(">BBI", header)
        if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
            raise ProtocolError(f"unknown PDU type 0x{pdu_type:02x}")
        if length > max_length:
            raise ProtocolError(f"PDU of {length} bytes exceeds the maximum of {max_length}")
        body = await reader.readexactly(length)
    return pdu_type, body


def is_cancel(message: Message) -> bool:
    return message.command.field == C_CANCEL_RQ

