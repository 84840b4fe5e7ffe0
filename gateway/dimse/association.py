"""One accepted DICOM association, served on the asyncio loop (PS3.8 acceptor role).

Reads PDUs, reassembles DIMSE messages and hands each one to the service registered
for its command. A C-STORE data set is streamed straight into its spool file (a
`Receipt`: file meta, then the bytes exactly as received) as its fragments arrive, so
an instance of any size costs no memory. Services run as
tasks so the reader keeps reading: that is how a C-CANCEL reaches a running C-FIND.

Any protocol violation (bad PDU, bad command, fragments out of order) aborts the
association with a log line; it never takes the process down. Every request gets a
final response, also when its service raises; and no write waits for ever on a peer
that stopped reading (`drain`). A spool short of space is not a protocol matter: free
space is checked at the C-STORE-RQ and every few MB of the data set, and a failed write
(ENOSPC, EIO) stops the file; the rest of that data set is then read and dropped and
the C-STORE is answered 0xA700, so the association carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gateway.dimse import pdu
from gateway.part10 import file_meta_header
from gateway.audit.auditor import Auditor, StudyTally, dimse_participant
from gateway.audit.message import Participant
from gateway.dimse.identity import Identity
from gateway.metrics import Metrics
from gateway.spool.queue import SPACE_CHECK_BYTES
from gateway.spool.receipt import Receipt
from gateway.dimse.command import (
    C_CANCEL_RQ,
    C_FIND_RQ,
    C_GET_RQ,
    C_MOVE_RQ,
    C_STORE_RQ,
    Command,
    CommandError,
    decode_command,
    response,
)

log = logging.getLogger("gateway.dimse")

MAX_NON_STORE_DATASET = 4 * 1024 * 1024  # identifiers of C-FIND/MOVE/GET are small
# A command set is a few hundred bytes; fragments beyond this are a peer filling the
# daemon's memory (300 MiB of them took 300 MiB before this bound), not a command.
MAX_COMMAND_SET = 64 * 1024
# Requests queued on one association before its PDUs are read no further. No
# asynchronous operations window is negotiated, so a requester waits for each answer
# (a C-CANCEL comes while one runs); one that sends on regardless is held back by TCP
# until its queue is served: 200,000 C-ECHO-RQs sent without reading took 760 MB.
MAX_QUEUED_REQUESTS = 16
# Final statuses of a request whose service failed (PS3.7 C.4, PS3.4 B.2.3): C-STORE
# says Out of Resources so the sender keeps the instance and retries; the others say
# Processing failure.
PROCESSING_FAILURE = 0x0110
STORE_OUT_OF_RESOURCES = 0xA700
CANCEL_STATUS = 0xFE00
PENDING_STATUSES = frozenset({0xFF00, 0xFF01})
# The requests a C-CANCEL applies to (PS3.7 9.3.2.3, 9.3.3.3, 9.3.4.3).
CANCELLABLE = frozenset({C_FIND_RQ, C_MOVE_RQ, C_GET_RQ})


class ProtocolError(Exception):
    """The peer broke the upper layer or DIMSE protocol; the association is aborted."""


class SendError(ConnectionError):
    """Writing to the peer failed, or the peer took nothing for the whole timeout; the
    connection has been closed."""


Buffer = bytes | bytearray | memoryview
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def write_gathered(writer: asyncio.StreamWriter, buffers: Sequence[Buffer]) -> None:
    """Queue ``buffers`` on the connection, in order, without joining them first.

    When nothing is queued ahead of them on a plain TCP connection they go to the
    socket with writev, straight from where they lie (a data set's PDUs are its own
    bytes between 12-byte headers, so joining them would copy the whole data set once
    more); whatever the socket does not take then, and everything on a TLS connection,
    goes through the transport, which sends it as the peer reads. A socket error is
    left for the transport to meet on that write, and report as it does.
    """
    transport = writer.transport
    sent = 0
    sock = writer.get_extra_info("socket")
    if (
        sock is not None
        and writer.get_extra_info("ssl_object") is None
        and not transport.is_closing()
        and transport.get_write_buffer_size() == 0
    ):
        sent = _writev(sock.fileno(), buffers)
    rest = _after(buffers, sent)
    if rest:
        writer.write(b"".join(rest))


def _writev(fd: int, buffers: Sequence[Buffer]) -> int:
    """Bytes of ``buffers`` a non-blocking socket took, IOV_MAX buffers per call."""
    sent = 0
    for start in range(0, len(buffers), IOV_MAX):
        batch = buffers[start : start + IOV_MAX]
        try:
            took = os.writev(fd, batch)
        except (BlockingIOError, InterruptedError):
            return sent
        except OSError:
            return sent  # the transport meets it again and closes the connection
        sent += took
        if start + IOV_MAX < len(buffers) and took < sum(map(len, batch)):
            return sent  # the socket is full: the rest waits in the transport
    return sent


def _after(buffers: Sequence[Buffer], count: int) -> list[Buffer]:
    """What remains of ``buffers`` once their first ``count`` bytes are gone."""
    rest: list[Buffer] = []
    for buffer in buffers:
        size = len(buffer)
        if count >= size:
            count -= size
            continue
        rest.append(memoryview(buffer)[count:] if count else buffer)
        count = 0
    return rest


async def drain(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Wait until what was written has gone to the socket, at most ``timeout`` s.

    A peer that reads nothing for that long, or a local socket error, gets its
    connection closed at once (a transport abort: a plain close would keep the socket
    open until the buffered bytes are sent, i.e. for ever) and SendError is raised.
    """
    transport = writer.transport
    if transport.get_write_buffer_size() == 0 and not transport.is_closing():
        return  # all of it went to the socket: nothing to wait for (no timeout context)
    try:
        async with asyncio.timeout(timeout):
            await writer.drain()
    except (TimeoutError, OSError) as exc:
        writer.transport.abort()
        reason = f"peer read nothing for {timeout:g} s" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        raise SendError(reason) from None


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
    receipt: Receipt | None = None  # C-STORE: the spool file it was received into
    dataset: bytes | None = None  # other services: the encoded data set
    refused: str | None = None  # C-STORE not stored (spool full, write error): why


@dataclass
class AssociationStats:
    started: float = field(default_factory=time.monotonic)
    studies: StudyTally = field(default_factory=StudyTally)  # what was stored, for the audit trail
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
        receive: Callable[[], Receipt] | None,
        dimse_timeout: float,
        space_problem: Callable[[], str | None] | None = None,
        metrics: Metrics | None = None,
        *,
        audit: Auditor,
        address: str,
        where: str,
        identity: Identity | None = None,
    ) -> None:
        """``dimse_timeout`` bounds every write: how long a peer may read nothing.
        ``space_problem``: the spool's check of its disk limits (``spool.min_free_mb``,
        ``spool.max_size_mb``), which says why no more data can be taken; a C-STORE data
        set is then not written. ``receive``: a new spool file for a C-STORE's data set
        (`Spool.receive`); None: C-STORE data sets are refused. ``metrics``: where each request's final status and
        duration go. ``audit``: the audit trail its services report to; ``address``: the
        peer's IP address, as audit messages name it, ``where`` its address and port
        (the client a load balancer's PROXY protocol header named, if any); ``identity``: the user the
        association acts for (User Identity Negotiation), None when it named none."""
        self.identity = identity
        self.metrics = metrics
        self.audit = audit
        self.address = address
        self.space_check = space_problem
        self.reader = reader
        self.writer = writer
        self.rq = rq
        self.calling_ae = rq.calling_ae
        self.called_ae = rq.called_ae
        self.peer = f"{rq.calling_ae}@{where}"
        self.contexts = contexts
        self.peer_max_pdu = rq.max_pdu_length
        self.receive = receive
        self.dimse_timeout = dimse_timeout
        self.stats = AssociationStats()
        self._send_lock = asyncio.Lock()
        # message reassembly
        self._command_buf = bytearray()
        self._pending: Message | None = None
        self._sink: io.BytesIO | None = None  # the identifier of a non-store request
        self._receipt: Receipt | None = None  # the C-STORE data set being received
        self._space_checked = 0  # bytes of the store file at the last free-space check
        self._refused: str | None = None  # the C-STORE arriving is not being stored: why
        # running services, by message id, so C-CANCEL can reach them
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._last_task: asyncio.Task[None] | None = None
        self._fields: dict[int, int] = {}  # command field of each queued or running request
        self._started: set[int] = set()  # requests whose service has begun
        self._cancelled_early: set[int] = set()  # C-CANCEL arrived while still queued
        self._cancelled_running: set[int] = set()  # C-CANCEL cancelled the running service
        self._unanswered: set[int] = set()  # requests without their final response yet
        self._queued = 0  # requests dispatched whose service has not ended
        self._received_at: dict[int, float] = {}  # monotonic time each request was complete
        # Called when the last running request ends: the reader's idle timer restarts.
        self.on_idle: Callable[[], None] | None = None
        # C-GET: SOP classes for which the peer took the SCP role (we send C-STORE to
        # it), and the C-STORE-RSPs our sub-operations await, by message id.
        self.scp_roles: frozenset[str] = frozenset()
        self._responses: dict[int, asyncio.Future[Command]] = {}
        self._message_id = 0

    def participant(self) -> Participant:
        """The requestor as audit messages name it: its AE title and address, and the
        user it acts for when it named one (as UserName)."""
        return dimse_participant(self.calling_ae, self.address, True, self.identity.user if self.identity else "")

    # ---- sending --------------------------------------------------------------

    async def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        """Send one DIMSE message, fragmented to the peer's maximum PDU length.

        Raises SendError (the connection is then closed) if the peer does not take it
        within ``dimse_timeout``.
        """
        pdus = pdu.encode_pdata(context_id, command, True, self.peer_max_pdu)
        if dataset is not None:
            pdus += pdu.encode_pdata(context_id, dataset, False, self.peer_max_pdu)
        await self._write(pdus, self.dimse_timeout)
        rsp = decode_command(command)
        status = rsp.get(0x0900)
        if rsp.field & 0x8000 and status is not None and status not in PENDING_STATUSES:
            answered = int(rsp.get(0x0120, 0))  # type: ignore[arg-type]
            self._unanswered.discard(answered)
            self._observe(answered, rsp.field, int(status))  # type: ignore[arg-type]

    def _observe(self, message_id: int, field: int, status: int | None) -> None:
        """Report a request's end (its final status, None: never answered) to the metrics."""
        received = self._received_at.pop(message_id, None)
        if self.metrics is not None and received is not None:
            self.metrics.dimse_request(field, status, time.monotonic() - received)

    async def send_raw(self, data: Sequence[Buffer]) -> None:
        """Send PDUs already encoded, in pieces (C-GET sub-operations, A-RELEASE-RP)."""
        await self._write(data, self.dimse_timeout)

    def pdus(self, context_id: int, part: bytes, is_command: bool) -> bytes:
        """One message part (command or data set) as the PDUs ``send_message`` writes,
        for a caller that sends many messages in one write (C-FIND Pending responses)."""
        return b"".join(pdu.encode_pdata(context_id, part, is_command, self.peer_max_pdu))

    def write_now(self, data: bytes) -> None:
        """Hand whole messages' PDUs to the transport without waiting for the peer to
        take them; the caller's next ``send_raw``/``send_message`` waits (bounded by
        ``dimse_timeout``). Safe between other senders' messages: a holder of the send
        lock waits only after writing whole messages."""
        if not self.writer.is_closing():
            self.writer.write(data)

    async def _write(self, items: Sequence[Buffer], timeout: float) -> None:
        async with self._send_lock:
            if self.writer.is_closing():
                raise SendError("connection already closed")
            write_gathered(self.writer, items)
            await drain(self.writer, timeout)

    async def abort(self, timeout: float) -> None:
        """A-ABORT (service provider) and close the connection. While a message is on its
        way out the abort cannot be put between its PDUs (the peer might be stalling
        that very message), so the connection is just closed."""
        if not self._send_lock.locked():
            with contextlib.suppress(SendError):
                await self._write([pdu.encode_abort(2, 0)], timeout)
        self.writer.transport.abort()

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
                if len(self._command_buf) + len(fragment) > MAX_COMMAND_SET:
                    raise ProtocolError(f"command set longer than {MAX_COMMAND_SET} bytes")
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
        """Start the spool file: file meta, then the data set as received (the record's
        preamble is written when it is sealed).

        Below the free-space floor no file is opened: the data set is swallowed and
        the C-STORE refused, so an instance never fills the disk from the start.
        """
        self._space_checked = 0
        problem = self._space_problem()
        if problem is not None:
            self._refuse(problem)
            return
        if self.receive is None:
            self._refuse("no spool to store into")
            return
        header = file_meta_header(
            str(message.command.get(0x0002, "")),
            str(message.command.get(0x1000, "")),
            message.context.transfer_syntax,
            self.calling_ae,
        )
        try:
            self._receipt = self.receive()
            self._receipt.write(memoryview(header)[128:])
        except OSError as exc:
            self._refuse(_write_problem(exc))

    def _space_problem(self) -> str | None:
        """Why the spool cannot take more data now (a disk limit reached), or None."""
        if self.space_check is None:
            return None
        try:
            return self.space_check()
        except OSError as exc:
            return f"spool unusable: {exc.strerror}"

    def _refuse(self, reason: str) -> None:
        """Stop storing the C-STORE in progress: drop its partial file; its remaining
        fragments are read and discarded, and the C-STORE is answered with ``reason``."""
        if self._receipt is not None:
            with contextlib.suppress(OSError):
                self._receipt.abandon()
        self._receipt, self._refused = None, reason

    def _write_data(self, fragment: memoryview) -> None:
        if self._refused is not None:
            return  # the rest of a refused C-STORE data set
        receipt = self._receipt
        if receipt is None:
            sink = self._sink
            assert sink is not None
            if sink.tell() + len(fragment) > MAX_NON_STORE_DATASET:
                raise ProtocolError("identifier larger than the limit for query/retrieve requests")
            sink.write(fragment)
            return
        try:
            receipt.write(fragment)
        except OSError as exc:
            self._refuse(_write_problem(exc))
            return
        if receipt.length - self._space_checked >= SPACE_CHECK_BYTES:
            self._space_checked = receipt.length
            problem = self._space_problem()
            if problem is not None:
                self._refuse(problem)

    def _finish_dataset(self) -> Message:
        message = self._pending
        assert message is not None
        if self._refused is None and self._receipt is not None:
            message.receipt = self._receipt
        elif self._refused is None:
            message.dataset = self._sink.getvalue()  # type: ignore[union-attr]
        message.refused = self._refused
        self._pending, self._sink, self._receipt, self._refused = None, None, None, None
        return message

    def discard(self) -> None:
        """Drop a half-received data set (abort, timeout, protocol error)."""
        if self._receipt is not None:
            with contextlib.suppress(OSError):
                self._receipt.abandon()
        self._pending, self._sink, self._receipt, self._refused = None, None, None, None

    # ---- services -----------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Whether a request of this association is queued or in progress."""
        return self._last_task is not None and not self._last_task.done()

    def dispatch(self, message: Message, handler: Callable[[Association, Message], Awaitable[None]]) -> None:
        """Run a service for a message; requests are served in order, one at a time.

        Whatever the service does, the request ends with a final response: a service
        that raises is logged with its traceback and answered with a failure status
        (`_answer_failure`); one a C-CANCEL stopped before it answered (it answers
        Cancel itself, with its counts, once it has begun sub-operations) is answered
        Cancel; and the next request is served as usual.
        """
        previous = self._last_task
        message_id, command_field = message.command.message_id, message.command.field
        self._fields[message_id] = command_field
        self._unanswered.add(message_id)
        self._received_at[message_id] = time.monotonic()
        self._queued += 1

        async def run() -> None:
            try:
                if previous is not None:
                    await asyncio.wait([previous])  # its outcome is its own business
                if message_id in self._cancelled_early:
                    await self.send_message(message.context.id, response(message.command, command_field | 0x8000, CANCEL_STATUS))
                    return
                self._started.add(message_id)
                await handler(self, message)
            except asyncio.CancelledError:
                if message_id in self._cancelled_running and message_id in self._unanswered:
                    log.info(
                        "request 0x%04x (message id %d) from %s cancelled before any sub-operation or response",
                        command_field, message_id, self.peer,
                    )
                    with contextlib.suppress(SendError):
                        await self.send_message(message.context.id, response(message.command, command_field | 0x8000, CANCEL_STATUS))
                raise
            except SendError as exc:
                log.warning("request 0x%04x from %s not answered: %s", command_field, self.peer, exc)
            except Exception:  # noqa: BLE001 - a failing service must still answer, and only its request fails
                log.exception("request 0x%04x (message id %d) from %s failed", command_field, message_id, self.peer)
                await self._answer_failure(message)
            finally:
                if message.receipt is not None:
                    with contextlib.suppress(OSError):
                        message.receipt.abandon()  # unless the service sealed it
                if message_id in self._unanswered:
                    self._observe(message_id, command_field, None)
                self.tasks.pop(message_id, None)
                self._fields.pop(message_id, None)
                for ids in (self._started, self._cancelled_early, self._cancelled_running, self._unanswered):
                    ids.discard(message_id)
                self._queued -= 1

        task = asyncio.create_task(run())
        self.tasks[message_id] = task
        self._last_task = task
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        if task is self._last_task and self.on_idle is not None:
            self.on_idle()

    async def _answer_failure(self, message: Message) -> None:
        """The final response of a request whose service raised before sending it."""
        command = message.command
        if command.message_id not in self._unanswered:
            return
        status = STORE_OUT_OF_RESOURCES if command.field == C_STORE_RQ else PROCESSING_FAILURE
        if command.field == C_STORE_RQ:
            self.stats.failed += 1
        rsp = response(command, command.field | 0x8000, status, extra={0x0902: "internal error"})
        with contextlib.suppress(SendError):
            await self.send_message(message.context.id, rsp)

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
        """C-CANCEL-RQ: cancel the C-FIND, C-MOVE or C-GET it names, if not finished.

        A running one is cancelled (its service answers with Cancel); a queued one is
        answered with Cancel when its turn comes, without being run. C-CANCEL applies
        to nothing else, so a C-STORE it names still completes and is answered.
        """
        target = message.command.get(0x0120)
        message_id = int(target) if target is not None else -1  # type: ignore[arg-type]
        task = self.tasks.get(message_id)
        if task is None or task.done() or self._fields.get(message_id) not in CANCELLABLE:
            return
        if message_id in self._started:
            self._cancelled_running.add(message_id)
            task.cancel()
        else:
            self._cancelled_early.add(message_id)

    @property
    def queued(self) -> int:
        """Requests received and not yet served to their end (the running one included;
        counted, not keyed by message ID, which a peer may repeat)."""
        return self._queued

    async def drain_tasks(self) -> None:
        """Wait until every request received has been served (A-RELEASE-RQ)."""
        if self._last_task is not None:
            await asyncio.wait([self._last_task])


def _write_problem(exc: OSError) -> str:
    """A C-STORE refusal reason for a failed write of its file."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"spool disk full: {exc.strerror}"
    return f"spool write error: {exc.strerror}"


async def read_pdu(reader: asyncio.StreamReader, timeout: float | None, max_length: int) -> tuple[int, bytes]:
    """Read one PDU; enforce the timeout (None: the caller's, which opens no timeout
    context of its own: one per PDU costs as much as reading a small PDU) and our
    announced maximum length."""
    if timeout is None:
        return await _read_pdu(reader, max_length)
    async with asyncio.timeout(timeout):
        return await _read_pdu(reader, max_length)


async def _read_pdu(reader: asyncio.StreamReader, max_length: int) -> tuple[int, bytes]:
    header = await reader.readexactly(6)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if pdu_type not in (1, 2, 3, 4, 5, 6, 7):
        raise ProtocolError(f"unknown PDU type 0x{pdu_type:02x}")
    if length > max_length:
        raise ProtocolError(f"PDU of {length} bytes exceeds the maximum of {max_length}")
    return pdu_type, await reader.readexactly(length)


def is_cancel(message: Message) -> bool:
    return message.command.field == C_CANCEL_RQ

