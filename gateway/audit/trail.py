"""Delivery of audit messages to an Audit Record Repository by syslog and/or to a file,
without ever making the caller wait.

`AuditTrail.record` only appends the event to each destination's bounded queue and
returns; one daemon thread formats and sends. An unreachable repository must not slow
down a C-STORE, so a full queue drops the event and counts it instead of blocking.

Each destination has its own queue (10,000 messages) and its own retry schedule, so a
repository outage neither stops the local audit file nor loses what fits in the queue:
a message that could not be sent stays at the head and is sent again after a back-off
(0.5 s doubling to 30 s). Delivery is at least once: a connection that breaks while a
message is in flight can make the repository see it twice, never zero times.

Every message is an RFC 5424 syslog message whatever the destination, so the file
holds exactly what the repository would have received, one message per line.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from collections import deque
from pathlib import Path

from gateway.audit.message import AuditEvent, event_datetime, to_xml
from gateway.config import AuditConfig

log = logging.getLogger("gateway.audit")

QUEUE_SIZE = 10_000
BATCH = 500
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
# PRI <85>: facility 10 (security/authorization) and severity 5 (notice), as DICOM
# PS3.15 A.6/A.7 and IHE ITI-20 ask for audit messages.
PRI = 85
APP_NAME = "dicom-gateway"
# MSGID: DICOM PS3.15 A.6 only says "DICOM+RFC3881" *may* be used, while IHE ITI TF-2
# 3.20 (ITI-20, the transaction repositories implement) names "IHE+RFC-3881" for the
# DICOM audit message too; the name predates the DICOM schema (which extends RFC 3881)
# and was kept. Repositories and their validators key on the IHE value, so it is used.
MSGID = "IHE+RFC-3881"
# The largest payload of one UDP datagram over IPv4 (65,535 minus the IP and UDP headers).
MAX_DATAGRAM = 65_507


class _Undeliverable(Exception):
    """A message this destination can never take (too big for a datagram): retrying
    it would block every message behind it, so it is dropped."""


class _Entry:
    """One recorded event, formatted at most once even when two destinations send it."""

    __slots__ = ("event", "line")

    def __init__(self, event: AuditEvent) -> None:
        self.event = event
        self.line: bytes | None = None


class _Destination:
    """Where messages go, with its own queue and retry schedule. Only the sender
    thread calls `prepare`, `send` and `close`."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.backlog: deque[_Entry] = deque()
        self.error = ""
        self.failures = 0
        self.backoff = 0.0
        self.retry_at = 0.0
        self.failed_at = 0.0
        self.since = 0.0  # Unix time of the first failure of the current outage

    def due(self, now: float, closing: bool) -> bool:
        """Whether to try now: after the back-off, or while closing, soon after the
        last failure (close has a deadline of its own, no time for a long back-off)."""
        if not self.backlog:
            return False
        return now >= (min(self.retry_at, self.failed_at + FIRST_BACKOFF) if closing else self.retry_at)

    def prepare(self) -> None:
        """Ready to send a batch: connected, or the file (re)opened."""
        raise NotImplementedError

    def send(self, line: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def failed(self, exc: BaseException, now: float) -> None:
        """Note a failed attempt: close, wait longer before the next one, and warn on
        the first failure only, so an outage is one line in the log, not thousands."""
        self.close()
        self.error = _describe(exc)
        self.failures += 1
        self.backoff = min(MAX_BACKOFF, self.backoff * 2) if self.backoff else FIRST_BACKOFF
        self.failed_at = now
        self.retry_at = now + self.backoff
        if self.failures == 1:
            self.since = time.time()
            log.warning("audit trail: %s failed (%s); keeping messages and retrying", self.name, self.error)

    def succeeded(self) -> None:
        if self.failures:
            log.info("audit trail: %s delivering again after %d failed attempts", self.name, self.failures)
        self.error = ""
        self.failures = 0
        self.backoff = 0.0
        self.retry_at = 0.0
        self.failed_at = 0.0


class _FileDestination(_Destination):
    """Appends each message as one line; reopens the file when logrotate moved it away."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"file {path}")
        self.path = path
        self.fd: int | None = None

    def prepare(self) -> None:
        if self.fd is not None and self._rotated():
            self.close()
        if self.fd is None:
            # 0o600 on creation: the file holds who accessed which study.
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _rotated(self) -> bool:
        assert self.fd is not None
        if os.fstat(self.fd).st_nlink == 0:
            return True
        try:
            return os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return True

    def send(self, line: bytes) -> None:
        # One write(2) per line straight to the kernel (O_APPEND): no user-space buffer
        # that a crash could lose, and no line interleaved with another writer's.
        assert self.fd is not None
        data = memoryview(line + b"\n")
        while data:
            data = data[os.write(self.fd, data):]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _UdpDestination(_Destination):
    """RFC 5426: one datagram per message, nothing to connect or frame."""

    def __init__(self, url: str, host: str, port: int) -> None:
        super().__init__(f"syslog {url}")
        self.host, self.port = host, port
        self.sock: socket.socket | None = None
        self.address: tuple[object, ...] = ()

    def prepare(self) -> None:
        if self.sock is None:
            family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(family, kind, proto)
            self.address = address

    def send(self, line: bytes) -> None:
        assert self.sock is not None
        if len(line) > MAX_DATAGRAM:
            raise _Undeliverable(f"{len(line)} bytes do not fit in one UDP datagram")
        try:
            self.sock.sendto(line, self.address)
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                raise _Undeliverable(f"{len(line)} bytes do not fit in one UDP datagram") from exc
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class _StreamDestination(_Destination):
    """RFC 6587 octet counting over TCP, or RFC 5425 over TLS: one connection kept open."""

    def __init__(self, url: str, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        super().__init__(f"syslog {url}")
        self.host, self.port, self.tls = host, port, tls
        self.sock: socket.socket | None = None

    def prepare(self) -> None:
        if self.sock is not None and self._peer_closed():
            self.close()
        if self.sock is None:
            sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT)
            try:
                if self.tls is not None:
                    sock = self.tls.wrap_socket(sock, server_hostname=self.host)
                sock.settimeout(SEND_TIMEOUT)
            except BaseException:
                sock.close()
                raise
            self.sock = sock

    def _peer_closed(self) -> bool:
        """Whether the repository closed the connection. A receiver never writes to
        it, so anything readable is its end of the stream (or TLS housekeeping such
        as a session ticket). Checked before each batch because the first send into a
        closed connection still succeeds, and its message would be silently lost."""
        assert self.sock is not None
        # A non-blocking read rather than select(), which fails on descriptors past
        # 1024, a number a busy gateway reaches.
        self.sock.setblocking(False)
        try:
            return self.sock.recv(4096) == b""
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(SEND_TIMEOUT)

    def send(self, line: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(b"%d %s" % (len(line), line))

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None


class AuditTrail:
    """Audit messages to ``config.syslog`` and/or ``config.file``, sent by one daemon
    thread. Counters for metrics, each counted per destination: ``sent`` messages
    delivered, ``dropped`` messages lost (queue full, too big for a datagram, or still
    queued when `close` gave up), ``failed`` send attempts that raised."""

    def __init__(
        self,
        config: AuditConfig,
        source_id: str,
        tls_context: ssl.SSLContext | None = None,
        hostname: str | None = None,
    ) -> None:
        self.source_id = source_id
        self.site_id = config.enterprise_site_id
        self.hostname = _header_field(hostname or socket.gethostname(), 255)
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._destinations: list[_Destination] = []
        if config.syslog:
            self._destinations.append(_syslog_destination(config.syslog, tls_context))
        if config.file is not None:
            self._destinations.append(_FileDestination(config.file))
        self._lock = threading.Condition()
        self._closing = False
        self._deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="audit-trail", daemon=True)
        self._thread.start()

    @property
    def last_error(self) -> str:
        """Why delivery is failing, per failing destination; "" when all are fine."""
        return "; ".join(f"{d.name}: {d.error}" for d in self._destinations if d.error)

    @property
    def failing_since(self) -> float | None:
        """Unix time delivery to a destination began failing (the earliest), for
        /healthz; None when every destination delivers."""
        return min((d.since for d in self._destinations if d.error), default=None)

    def record(self, event: AuditEvent) -> None:
        """Queue the event for every destination and return at once (any thread)."""
        entry = _Entry(event)
        with self._lock:
            wake = False
            for destination in self._destinations:
                if self._closing or len(destination.backlog) >= QUEUE_SIZE:
                    self.dropped += 1
                    continue
                wake = wake or not destination.backlog
                destination.backlog.append(entry)
            if wake:
                self._lock.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued (for up to ``timeout`` seconds, retrying a failed
        destination every 0.5 s instead of after its back-off), then stop the thread
        and close the connection and the file; what is left is counted as dropped."""
        with self._lock:
            if not self._closing:
                self._closing = True
                self._deadline = time.monotonic() + timeout
                self._lock.notify()
        self._thread.join(timeout + CONNECT_TIMEOUT)

    def _run(self) -> None:
        try:
            while due := self._wait_for_work():
                for destination in due:
                    self._drain(destination)
        finally:
            with self._lock:
                for destination in self._destinations:
                    self.dropped += len(destination.backlog)
                    destination.backlog.clear()
            for destination in self._destinations:
                destination.close()

    def _wait_for_work(self) -> list[_Destination]:
        """Sleep until destinations have messages and may be tried, and return them;
        an empty list when it is time to stop."""
        with self._lock:
            while True:
                now = time.monotonic()
                closing = self._closing
                waiting = [d for d in self._destinations if d.backlog]
                if closing and (not waiting or now >= self._deadline):
                    return []
                due = [d for d in waiting if d.due(now, closing)]
                if due:
                    return due
                wake_at = [d.retry_at for d in waiting]
                if closing:
                    wake_at += [self._deadline] + [d.failed_at + FIRST_BACKOFF for d in waiting]
                self._lock.wait(max(0.0, min(wake_at) - now) if wake_at else None)

    def _drain(self, destination: _Destination) -> None:
        """Send up to one batch from the head of the destination's queue; a message
        leaves the queue only once it was sent (or can never be)."""
        with self._lock:
            batch = [destination.backlog[i] for i in range(min(BATCH, len(destination.backlog)))]
        try:
            destination.prepare()
            for entry in batch:
                try:
                    destination.send(self._line(entry))
                except _Undeliverable as exc:
                    self.failed += 1
                    log.warning("audit trail: %s dropped a message: %s", destination.name, exc)
                    self._pop(destination, sent=False)
                else:
                    self._pop(destination, sent=True)
        except (OSError, ValueError) as exc:
            # ValueError: a host name that IDNA cannot encode, a closed file descriptor.
            self.failed += 1
            destination.failed(exc, time.monotonic())
        else:
            destination.succeeded()

    def _pop(self, destination: _Destination, sent: bool) -> None:
        with self._lock:
            destination.backlog.popleft()
            if sent:
                self.sent += 1
            else:
                self.dropped += 1

    def _line(self, entry: _Entry) -> bytes:
        """The RFC 5424 message: header, no structured data, the XML as MSG (UTF-8
        without a BOM, which IHE asks senders to leave out)."""
        if entry.line is None:
            try:
                xml = to_xml(entry.event, self.source_id, self.site_id)
            except Exception as exc:  # any: one malformed event must not stop the thread
                raise _Undeliverable(f"it cannot be written as XML ({type(exc).__name__}: {exc})") from exc
            header = f"<{PRI}>1 {event_datetime(entry.event.when)} {self.hostname} {APP_NAME} {os.getpid()} {MSGID} - "
            entry.line = header.encode("ascii") + xml
        return entry.line


def _syslog_destination(url: str, tls_context: ssl.SSLContext | None) -> _Destination:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("udp", "tcp", "tls") or not parts.hostname or parts.port is None:
        raise ValueError(f"audit syslog {url!r} is not udp://, tcp:// or tls:// with a host and port")
    if parts.scheme == "udp":
        return _UdpDestination(url, parts.hostname, parts.port)
    tls = (tls_context or ssl.create_default_context()) if parts.scheme == "tls" else None
    return _StreamDestination(url, parts.hostname, parts.port, tls)


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, or the NILVALUE."""
    cleaned = "".join(c if "!" <= c <= "~" else "-" for c in value)[:limit]
    return cleaned or "-"


def _describe(exc: BaseException) -> str:
    """An error in words for an operator (no message contents are ever in it)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verify failed: {exc.verify_message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
