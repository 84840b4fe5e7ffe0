"""An asyncio association requestor for C-STORE sub-operations (PS3.8 requestor role).

C-MOVE sends every instance of a retrieval over one association to the destination.
pynetdicom's SCU would do it, but its reactor polls with 1 ms sleeps, which caps it
well below what storescp or a PACS can take; on the loop a C-STORE costs a socket
write and the wait for the response, nothing more.

One operation is outstanding at a time (no asynchronous operations window is
negotiated), so the response is read inline after each request. A data set is
written straight from the retrieved bytes (gathered with writev between the PDU
headers) or file (read with preadv into its PDUs, chunk by chunk), fragmented to the
peer's maximum PDU length, without building the PDUs for a whole large instance in
memory or copying the bytes on the way more than once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from gateway.codecs.syntaxes import EXPLICIT_VR_LE, IMPLICIT_VR_LE
from gateway.config import Config, Peer
from gateway.dimse import pdu
from gateway.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.dimse.association import (
    IOV_MAX,
    Buffer,
    ProtocolError,
    SendError,
    drain,
    read_pdu,
    write_gathered,
)
from gateway.dimse.command import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    HAS_DATASET,
    NO_DATASET,
    VERIFICATION,
    Command,
    CommandError,
    decode_command,
    encode_command,
)
from gateway.retrieval.source import DataSource, FileSlice

log = logging.getLogger("gateway.dimse")

# Every SCP accepts Implicit VR Little Endian (PS3.5 10.1) and most Explicit: what a
# context proposes when nothing else is needed, and what every syntax we decode converts to.
UNCOMPRESSED = (EXPLICIT_VR_LE, IMPLICIT_VR_LE)
MAX_CONTEXTS = 128  # presentation context ids are the odd numbers 1..255
# Bytes of a file data set read (in a worker thread) per write; bounds memory per send.
FILE_CHUNK = 4 << 20


class RequestorError(Exception):
    """The association to the peer could not be opened or broke down."""


class SourceUnreadable(Exception):
    """The file a C-STORE's data set was to come from could not be opened (the
    archive deleted or replaced it since it was listed). Nothing of the message was
    written, so the association is as it was: only this sub-operation fails."""


# PS3.8 Table 9-21: (source, reason) of an A-ASSOCIATE-RJ, in the words an admin acts on.
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class AssociationRejected(RequestorError):
    """The peer answered A-ASSOCIATE-RJ."""

    def __init__(self, result: int, source: int, reason: int, named_user: bool = False) -> None:
        words = REJECT_REASONS.get((source, reason), f"source {source}, reason {reason}")
        kind = {1: "permanent", 2: "transient"}.get(result, f"result {result}")
        # an acceptor refusing a user identity answers source 2 (its ACSE function)
        hint = "; the peer may not accept the user the gateway named (its peer entry's user and passcode)"
        super().__init__(f"association rejected ({kind}: {words}{hint if named_user and source == 2 else ''})")
        self.result, self.source, self.reason = result, source, reason


def _fragment_size(peer_max_pdu: int) -> int:
    """Data set bytes per P-DATA-TF: the peer's maximum PDU less the 6 bytes of the PDV
    item header (1 MiB when the peer sets no limit)."""
    return max((peer_max_pdu - 6) if peer_max_pdu else (1 << 20), 1)


def pdata_pieces(
    context_id: int, payload: memoryview, is_command: bool, last_part: bool, peer_max_pdu: int
) -> list[bytes | memoryview]:
    """P-DATA-TF PDUs carrying ``payload``, one PDV each, fragmented to the peer's
    maximum; the final one is flagged last when ``last_part``. As pieces: each PDU's
    12 header bytes, then its fragment, a view of ``payload`` (nothing is copied)."""
    limit = _fragment_size(peer_max_pdu)
    kind = 1 if is_command else 0
    # Every fragment but the last is full, with the same header.
    full = struct.pack(">BBIIBB", pdu.P_DATA_TF, 0, limit + 6, limit + 2, context_id, kind)
    pieces: list[bytes | memoryview] = []
    offset, end = 0, len(payload)
    while end - offset > limit:
        pieces.append(full)
        pieces.append(payload[offset : offset + limit])
        offset += limit
    size = end - offset
    control = kind | (2 if last_part else 0)
    pieces.append(struct.pack(">BBIIBB", pdu.P_DATA_TF, 0, size + 6, size + 2, context_id, control))
    pieces.append(payload[offset:])
    return pieces


class FrameBuffer:
    """Memory for the PDUs of a file's chunks, kept from one C-STORE to the next: fresh
    memory would be zeroed and faulted in for every instance. Reuse is safe because
    `write_gathered` keeps no reference (what the socket does not take at once goes to
    the transport as a copy). A larger need gets a new buffer, never a resize, since a
    view of the old one may still be alive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def take(self, size: int) -> memoryview:
        if len(self._buffer) < size:
            self._buffer = bytearray(size)
        return memoryview(self._buffer)[:size]


def pdata_frame(
    frames: FrameBuffer, context_id: int, length: int, last_part: bool, peer_max_pdu: int, prefix: bytes = b""
) -> tuple[memoryview, list[memoryview]]:
    """``prefix``, then the P-DATA-TF PDUs for ``length`` bytes of a data set, laid out
    in memory from ``frames`` with their headers written and their data left to fill:
    returns the whole and the slots, in order, that the data set's bytes go to. A file
    is read straight into the slots (`_read_into`), so the PDUs are built without
    copying the data set again."""
    limit = _fragment_size(peer_max_pdu)
    count = max(-(-length // limit), 1)
    frame = frames.take(len(prefix) + length + 12 * count)
    frame[: len(prefix)] = prefix
    slots: list[memoryview] = []
    position, left = len(prefix), length
    for index in range(count):
        size = min(limit, left)
        left -= size
        control = 2 if last_part and index == count - 1 else 0
        struct.pack_into(">BBIIBB", frame, position, pdu.P_DATA_TF, 0, size + 6, size + 2, context_id, control)
        slots.append(frame[position + 12 : position + 12 + size])
        position += 12 + size
    return frame, slots


def _read_into(fd: int, slots: list[memoryview], offset: int) -> None:
    """Fill ``slots`` with the file's bytes from ``offset`` on, with as few preadv
    calls as the kernel allows (IOV_MAX slots each)."""
    pending = deque(slot for slot in slots if len(slot))
    while pending:
        got = os.preadv(fd, list(itertools.islice(pending, IOV_MAX)), offset)
        if got == 0:
            raise OSError("retrieved file shorter than recorded")
        offset += got
        while got:
            slot = pending[0]
            if got >= len(slot):
                got -= len(slot)
                pending.popleft()
            else:
                pending[0] = slot[got:]
                got = 0


async def send_dataset(
    write: Callable[[Sequence[Buffer]], Awaitable[None]],
    context_id: int,
    dataset: DataSource,
    peer_max_pdu: int,
    command: bytes,
    frames: FrameBuffer | None = None,
) -> None:
    """Write the PDUs of a ``command`` (encoded) and its data set; ``write`` takes
    them as pieces and gathers them into one write (`write_gathered`). The command
    goes in the same write as the first data, so the receiver is woken once per
    message rather than twice. Data in memory goes from where it lies; a file is read
    in bounded chunks (large ones in a worker thread), each straight into its PDUs, so
    an instance of any size costs at most FILE_CHUNK of memory (``frames``: the
    sender's own, reused) and one read and one write per chunk."""
    head = b"".join(pdata_pieces(context_id, memoryview(command), True, True, peer_max_pdu))
    if not isinstance(dataset, FileSlice):
        await write([head, *pdata_pieces(context_id, memoryview(dataset), False, True, peer_max_pdu)])
        return
    loop = asyncio.get_running_loop()
    # Chunks are whole multiples of the fragment size, so no short PDU goes out mid-way.
    limit = _fragment_size(peer_max_pdu)
    chunk_size = limit * max(1, min(FILE_CHUNK // limit, IOV_MAX))
    frames = frames or FrameBuffer()
    try:
        fd = os.open(dataset.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise SourceUnreadable(f"the stored file cannot be opened ({exc.strerror or type(exc).__name__})") from None
    try:
        offset, remaining = dataset.offset, dataset.length
        while True:
            size = min(chunk_size, remaining)
            remaining -= size
            frame, slots = pdata_frame(frames, context_id, size, remaining == 0, peer_max_pdu, head)
            if size > (1 << 20):
                await loop.run_in_executor(None, _read_into, fd, slots, offset)
            else:
                _read_into(fd, slots, offset)
            offset += size
            await write([frame])
            head = b""
            if remaining == 0:
                return
    finally:
        os.close(fd)


class StoreRequestor:
    """One open association on which we are the C-STORE SCU (and the C-ECHO SCU, to
    check a destination before anything is sent to it)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        proposed: list[pdu.PresentationContextRQ],
        ac: pdu.AssociateAC,
        max_pdu: int,
        dimse_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer_max_pdu = ac.max_pdu_length
        self.max_pdu = max_pdu
        self.dimse_timeout = dimse_timeout
        by_id = {pc.id: pc for pc in proposed}
        # sop class -> {transfer syntax: context id}, first accepted context wins
        self.accepted: dict[str, dict[str, int]] = {}
        for result in ac.contexts:
            pc = by_id.get(result.id)
            if pc is None or result.result != pdu.PC_ACCEPTED:
                continue
            self.accepted.setdefault(pc.abstract_syntax, {}).setdefault(result.transfer_syntax, result.id)
        self._message_id = 0
        self._frames = FrameBuffer()
        self.closed = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        calling_ae: str,
        called_ae: str,
        proposals: list[tuple[str, list[str]]],
        *,
        max_pdu: int,
        connect_timeout: float,
        acse_timeout: float,
        dimse_timeout: float,
        roles: list[pdu.RoleSelection] = (),  # type: ignore[assignment]
        tls: ssl.SSLContext | None = None,
        identity: pdu.UserIdentity | None = None,
    ) -> StoreRequestor:
        """Open the association proposing ``(sop class, [transfer syntaxes])`` contexts
        (and ``roles``: SCP/SCU Role Selection, e.g. our SCP role for Storage Commitment),
        over TLS with ``tls`` (the peer's certificate checked against ``host``), naming
        ``identity``'s user."""
        if not proposals or len(proposals) > MAX_CONTEXTS:
            raise ValueError(f"{len(proposals)} presentation contexts; 1 to {MAX_CONTEXTS} allowed")
        contexts = [pdu.PresentationContextRQ(2 * i + 1, sop, list(ts)) for i, (sop, ts) in enumerate(proposals)]
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, limit=1 << 20, ssl=tls, server_hostname=host if tls is not None else None
                )
        except ssl.SSLCertVerificationError as exc:
            raise RequestorError(f"TLS to {host}:{port} refused: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise RequestorError(f"TLS to {host}:{port} failed: {exc.reason or exc}") from None
        except (ConnectionResetError, ConnectionAbortedError) as exc:
            if tls is None:
                raise RequestorError(f"cannot connect to {host}:{port}: {type(exc).__name__}") from None
            raise RequestorError(
                f"TLS to {host}:{port} failed: {type(exc).__name__} in the handshake (does the peer speak TLS there?)"
            ) from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise RequestorError(f"cannot connect to {host}:{port}: {type(exc).__name__}") from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        try:
            writer.write(
                pdu.encode_associate_rq(
                    called_ae, calling_ae, contexts, max_pdu, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME,
                    list(roles), identity,
                )
            )
            await drain(writer, acse_timeout)
            pdu_type, body = await read_pdu(reader, acse_timeout, 1 << 20)
            if pdu_type == pdu.A_ASSOCIATE_RJ:
                raise AssociationRejected(*pdu.parse_associate_rj(body), identity is not None)
            if pdu_type != pdu.A_ASSOCIATE_AC:
                raise RequestorError(f"peer answered the association request with PDU type 0x{pdu_type:02x}")
            ac = pdu.parse_associate_ac(body)
            if 0 < ac.max_pdu_length < pdu.MIN_PEER_PDU:
                writer.write(pdu.encode_abort())
                await drain(writer, acse_timeout)
                raise RequestorError(
                    f"{called_ae} at {host}:{port} accepted with a maximum PDU length of {ac.max_pdu_length} bytes,"
                    f" below the {pdu.MIN_PEER_PDU} the gateway sends in: association aborted"
                )
        except RequestorError:
            writer.close()
            raise
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ProtocolError, pdu.PDUError) as exc:
            writer.close()
            raise RequestorError(f"association negotiation failed: {type(exc).__name__}: {exc}") from None
        return cls(reader, writer, contexts, ac, max_pdu, dimse_timeout)

    @classmethod
    async def to_peer(
        cls,
        config: Config,
        peer: Peer,
        proposals: list[tuple[str, list[str]]],
        *,
        roles: list[pdu.RoleSelection] = (),  # type: ignore[assignment]
        timeout: float | None = None,
    ) -> StoreRequestor:
        """Open an association to a configured peer the way the gateway always calls
        one: from ``dimse.ae_title``, with ``dimse.max_pdu_size``, the ``dimse``
        timeouts (or ``timeout`` for all of them), TLS when the peer asks for it, and the
        peer entry's ``user`` (and ``passcode``) named in the request."""
        d = config.dimse
        return await cls.connect(
            peer.host, peer.port, d.ae_title, peer.ae_title, proposals, max_pdu=d.max_pdu_size,
            connect_timeout=timeout or d.acse_timeout, acse_timeout=timeout or d.acse_timeout,
            dimse_timeout=timeout or d.dimse_timeout, roles=roles, tls=config.peer_tls(peer),
            identity=pdu.UserIdentity(
                2 if peer.passcode else 1, False, peer.user.encode("utf-8"), peer.passcode.encode("utf-8")
            ) if peer.user else None,
        )

    async def store(
        self,
        context_id: int,
        sop_class: str,
        sop_instance: str,
        dataset: DataSource,
        originator: tuple[str, int] | None = None,
    ) -> Command:
        """Send one C-STORE-RQ and return its C-STORE-RSP command.

        Raises RequestorError when the association breaks, the peer takes nothing for
        ``dimse_timeout`` or does not answer within it; the connection is then closed
        and the caller fails this and every later sub-operation.
        """
        self._message_id = self._message_id % 0xFFFF + 1
        values: dict[int, int | str | tuple[int, ...]] = {
            0x0002: sop_class,
            0x0100: C_STORE_RQ,
            0x0110: self._message_id,
            0x0700: 0,
            0x0800: HAS_DATASET,
            0x1000: sop_instance,
        }
        if originator is not None:
            values[0x1030], values[0x1031] = originator
        try:
            await send_dataset(self._write, context_id, dataset, self.peer_max_pdu, encode_command(values), self._frames)
            return await self._response(self._message_id, C_STORE_RSP)
        except SendError as exc:  # before OSError: SendError is one; the socket is closed
            self.closed = True
            raise RequestorError(f"cannot send: {exc}") from None
        except asyncio.TimeoutError:  # before OSError: TimeoutError is one
            await self.abort()
            raise RequestorError(f"no C-STORE response within {self.dimse_timeout:g} s") from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.closed = True
            self.writer.transport.abort()
            raise RequestorError(f"association lost: {type(exc).__name__}") from None
        except (ProtocolError, pdu.PDUError, CommandError) as exc:
            await self.abort()
            raise RequestorError(f"protocol error from the peer: {exc}") from None
        except asyncio.CancelledError:
            # Cut off mid-message (shutdown, or the requester gone): such an association
            # can only be dropped, and a release would wait on a peer that may be stalled.
            self.closed = True
            self.writer.transport.abort()
            raise

    async def echo(self, context_id: int) -> int:
        """Send one C-ECHO-RQ on the Verification context ``context_id`` and return the
        C-ECHO-RSP status. Raises RequestorError as `store` does."""
        answer = await self.request(context_id, {0x0002: VERIFICATION, 0x0100: C_ECHO_RQ}, None, C_ECHO_RSP)
        return int(answer.get(0x0900, -1))  # type: ignore[arg-type]

    async def request(
        self, context_id: int, values: dict[int, int | str | tuple[int, ...]], dataset: bytes | None, rsp_field: int
    ) -> Command:
        """Send one request with a small in-memory data set (or none) and return its
        response command (C-ECHO; N-EVENT-REPORT of a storage commitment)."""
        self._message_id = self._message_id % 0xFFFF + 1
        command = encode_command({**values, 0x0110: self._message_id, 0x0800: NO_DATASET if dataset is None else HAS_DATASET})
        pieces = pdu.encode_pdata(context_id, command, True, self.peer_max_pdu)
        if dataset is not None:
            pieces += pdu.encode_pdata(context_id, dataset, False, self.peer_max_pdu)
        try:
            await self._write(pieces)
            return await self._response(self._message_id, rsp_field)
        except asyncio.TimeoutError:
            await self.abort()
            raise RequestorError(f"no response within {self.dimse_timeout:g} s") from None
        except (OSError, asyncio.IncompleteReadError, ProtocolError, pdu.PDUError, CommandError) as exc:
            await self.abort()
            raise RequestorError(f"request failed: {type(exc).__name__}: {exc}") from None

    async def _write(self, pieces: Sequence[Buffer]) -> None:
        write_gathered(self.writer, pieces)
        await drain(self.writer, self.dimse_timeout)

    async def _response(self, message_id: int, field: int) -> Command:
        buffer = bytearray()
        async with asyncio.timeout(self.dimse_timeout):
            while True:
                pdu_type, body = await read_pdu(self.reader, None, self.max_pdu + 64 if self.max_pdu else 1 << 26)
                if pdu_type == pdu.A_ABORT:
                    self.closed = True
                    raise ConnectionError("peer aborted the association")
                if pdu_type != pdu.P_DATA_TF:
                    raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} while awaiting a response")
                for _, control, fragment in pdu.parse_pdata(body):
                    if not control & 1:
                        raise ProtocolError("data set fragment in a response")
                    buffer += fragment
                    if control & 2:
                        command = decode_command(bytes(buffer))
                        buffer.clear()
                        if command.field != field or command.get(0x0120) != message_id:
                            raise ProtocolError(f"unexpected response 0x{command.field:04x}")
                        return command

    async def release(self, timeout: float = 10.0) -> None:
        """A-RELEASE-RQ, wait for the RP (or give up and abort), close."""
        if self.closed:
            return
        try:
            self.writer.write(pdu.encode_release_rq())
            await drain(self.writer, timeout)
            async with asyncio.timeout(timeout):
                while True:
                    pdu_type, _ = await read_pdu(self.reader, timeout, 1 << 26)
                    if pdu_type in (pdu.A_RELEASE_RP, pdu.A_ABORT):
                        break
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ProtocolError, pdu.PDUError):
            await self.abort()
        finally:
            self.closed = True
            self.writer.close()

    async def abort(self) -> None:
        """A-ABORT (service user) and close; used on timeouts and cancellation. A peer
        that does not take the abort within 2 s has its connection closed regardless."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.writer.write(pdu.encode_abort(0, 0))
                await drain(self.writer, 2)
        with contextlib.suppress(Exception):
            self.writer.close()
