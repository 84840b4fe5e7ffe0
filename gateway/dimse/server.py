"""The DIMSE SCP: listens, negotiates associations, and routes messages to services.

An asyncio acceptor rather than pynetdicom's thread-per-association server: pynetdicom's
reactors poll with 1 ms sleeps, which capped C-STORE at ~250-330 instances/s here
(512 KB CT, loopback) against dcmtk's ~2300/s. On the loop, a C-STORE costs the
network read, the file write and the durable spool commit (in a worker thread).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

from pynetdicom import AllStoragePresentationContexts

from gateway.config import PERMISSIONS, Config
from gateway.connection_cap import ConnectionCap
from gateway.dimse import pdu
from gateway.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from gateway.dimse.association import (
    MAX_QUEUED_REQUESTS,
    AcceptedContext,
    Association,
    Message,
    ProtocolError,
    drain,
    is_cancel,
    read_pdu,
)
from gateway.dimse.command import C_ECHO_RQ, C_ECHO_RSP, STORAGE_COMMITMENT, VERIFICATION, response
from gateway.dimse.proxy_protocol import ProxyHeaderError, read_header, wait_readable
from gateway.dimse.identity import RJ_IDENTITY, RJ_IDENTITY_TRANSIENT, Identity, Outcome, TokenCheck, check_identity
from gateway.lockout import FailedLogins
from gateway.listening import endpoint, listen_on, opening
from gateway.log_throttle import Throttle, left_out
from gateway.audit.auditor import Auditor, dimse_participant, ip_of
from gateway.audit.message import Participant
from gateway.metrics import Metrics
from gateway.spool.receipt import Receipt
from gateway.trusted import address_of, is_trusted, networks

log = logging.getLogger("gateway.dimse")

STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
STORAGE_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]
# Every transfer syntax a modality commonly proposes for storage. Instances are stored
# exactly as received, so accepting a syntax never requires us to decode it.
STORAGE_TRANSFER_SYNTAXES = frozenset(
    UNCOMPRESSED
    + [
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Lossless
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2
        "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.100",  # MPEG2 MP@ML
        "1.2.840.10008.1.2.4.101",  # MPEG2 MP@HL
        "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 HP@4.1
        "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD
        "1.2.840.10008.1.2.4.104",  # MPEG-4 AVC/H.264 HP@4.2 2D
        "1.2.840.10008.1.2.4.105",  # MPEG-4 AVC/H.264 HP@4.2 3D
        "1.2.840.10008.1.2.4.106",  # MPEG-4 AVC/H.264 Stereo HP@4.2
        "1.2.840.10008.1.2.4.107",  # HEVC/H.265 MP@L5.1
        "1.2.840.10008.1.2.4.108",  # HEVC/H.265 M10P@L5.1
    ]
)

Handler = Callable[[Association, Message], Awaitable[None]]

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
RJ_NO_REASON = (1, 1, 1)
RJ_APPLICATION_CONTEXT = (1, 1, 2)
RJ_CALLING_AE_NOT_RECOGNIZED = (1, 1, 3)
RJ_CALLED_AE_NOT_RECOGNIZED = (1, 1, 7)
RJ_LOCAL_LIMIT_EXCEEDED = (2, 3, 2)
# An A-ABORT is a few bytes: a peer that cannot take them in this time is not reading.
ABORT_TIMEOUT = 2.0



@dataclass(frozen=True)
class Rejection:
    """Why an A-ASSOCIATE-RQ is rejected: the A-ASSOCIATE-RJ (result, source, reason),
    a metric label, and the reason in words for the log."""

    code: tuple[int, int, int]
    label: str
    why: str


QR_ROOT = "1.2.840.10008.5.1.4.1.2."
QR_PERMISSION = {"1": "find", "2": "move", "3": "get"}


def permission_for(abstract_syntax: str) -> str | None:
    """The peer permission a presentation context needs (None: always allowed)."""
    if is_storage_class(abstract_syntax) or abstract_syntax == STORAGE_COMMITMENT:
        return "store"
    if abstract_syntax.startswith(QR_ROOT):
        return QR_PERMISSION.get(abstract_syntax.rsplit(".", 1)[-1])
    return None


def is_storage_class(uid: str) -> bool:
    """Known storage SOP classes, and any other under the storage root (new or retired
    ones pynetdicom does not list), so no modality's images are refused for novelty."""
    return uid in STORAGE_CLASSES or uid.startswith(STORAGE_ROOT)


async def _echo(assoc: Association, message: Message) -> None:
    assoc.stats.echoed += 1
    await assoc.send_message(message.context.id, response(message.command, C_ECHO_RSP, 0x0000))


async def _unrecognized(assoc: Association, message: Message) -> None:
    """A request we do not serve (e.g. an N-service): 0x0211 Unrecognized Operation
    (PS3.7 C.5.3) rather than an abort, so the peer can carry on."""
    field = message.command.field
    log.warning("unsupported command 0x%04x from %s answered with 0x0211", field, assoc.peer)
    await assoc.send_message(message.context.id, response(message.command, field | 0x8000, 0x0211))


class DimseServer:
    """The listening SCP and its live associations."""

    def __init__(self, config: Config, receive: Callable[[], Receipt] | None, handlers: dict[int, Handler], abstract_syntaxes: dict[str, list[str]], metrics: Metrics | None = None, space_problem: Callable[[], str | None] | None = None, audit: Auditor | None = None, token_user: TokenCheck | None = None) -> None:
        """``handlers`` maps a request Command Field to its service; ``abstract_syntaxes``
        lists the non-storage SOP classes served, with the transfer syntaxes we accept;
        ``metrics`` receives association counts and request timings; ``space_problem``
        is the spool's check of its disk limits, run before and during each C-STORE
        data set; ``audit``: the audit trail, told of refused nodes and of what each
        association stored (its services tell it the rest); ``token_user``: the check
        of a JSON Web Token an association names its user by (None: not checked)."""
        self.token_user = token_user
        # addresses whose passcodes or tokens keep failing ([dimse.user_identity])
        self.failed_identities = FailedLogins(config.dimse.user_identity.max_failures_per_minute)
        self.space_problem = space_problem
        self.audit = audit if audit is not None else Auditor(config, None)
        self.metrics = metrics if metrics is not None else Metrics()
        self.config = config
        self.receive = receive
        self.handlers: dict[int, Handler] = {C_ECHO_RQ: _echo, **handlers}
        self.abstract_syntaxes = {VERIFICATION: UNCOMPRESSED, **abstract_syntaxes}
        self.max_pdu = config.dimse.max_pdu_size or (1 << 24)
        self._servers: list[asyncio.Server] = []
        self._live: set[asyncio.Task[None]] = set()
        self._associations: set[Association] = set()
        # on both ports together; bound to the file-descriptor limit set at start, so
        # not reloaded
        self.connection_cap = ConnectionCap("DIMSE", "dimse.max_connections", config.dimse.max_connections, self.metrics)
        self.unassociated = Throttle()  # warnings of connections broken off before an association

    @property
    def association_count(self) -> int:
        """Associations established now."""
        return len(self._associations)

    async def start(self) -> None:
        """Listen on ``dimse.tls.port`` (when configured), then on ``dimse.port``: once
        the plain port answers, both do."""
        d = self.config.dimse
        if d.tls is not None:
            with opening("DIMSE TLS port", d.host, d.tls.port):
                self._servers.append(await asyncio.start_server(
                    partial(self._on_connect, tls=d.tls.server_context()), **listen_on(d.host, d.tls.port), limit=1 << 20,
                ))
        with opening("DIMSE port", d.host, d.port):
            self._servers.append(await asyncio.start_server(self._on_connect, **listen_on(d.host, d.port), limit=1 << 20))

    async def stop(self, grace: float) -> None:
        """Stop accepting, let running associations finish for ``grace`` s, then abort them."""
        for server in self._servers:
            server.close()
        if self._live:
            _, pending = await asyncio.wait(set(self._live), timeout=grace)
            for assoc in self._associations:
                log.warning("aborting association from %s at shutdown", assoc.peer)
            await asyncio.gather(
                *(assoc.abort(min(ABORT_TIMEOUT, self.config.dimse.dimse_timeout)) for assoc in list(self._associations)),
                return_exceptions=True,
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    # ---- negotiation ----------------------------------------------------------------

    def negotiate(
        self, rq: pdu.AssociateRQ, address: str, identity: Identity | None = None
    ) -> tuple[Rejection | None, list[pdu.PresentationContextAC]]:
        """Decide on an A-ASSOCIATE-RQ from ``address``: a rejection, or the context
        results. A service is refused up front (its contexts rejected) that the calling
        peer's ``permissions`` leave out, or the verified ``identity``'s user's
        ``[dimse.user_identity] permissions``."""
        d = self.config.dimse
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            return Rejection(RJ_APPLICATION_CONTEXT, "application_context", "application context not supported"), []
        if 0 < rq.max_pdu_length < pdu.MIN_PEER_PDU:
            return Rejection(
                RJ_NO_REASON, "pdu_too_small",
                f"maximum PDU length {rq.max_pdu_length} is below the {pdu.MIN_PEER_PDU} bytes the gateway sends in",
            ), []
        if d.check_called_ae and rq.called_ae not in d.own_ae_titles:
            return Rejection(
                RJ_CALLED_AE_NOT_RECOGNIZED, "unknown_called_ae",
                "called AE title is none of the gateway's (dimse.ae_title, the routes' called_ae)",
            ), []
        peer = self.config.peer(rq.calling_ae)
        if d.require_known_peers and peer is None:
            return Rejection(RJ_CALLING_AE_NOT_RECOGNIZED, "unknown_calling_ae", "calling AE title not in dimse.peers"), []
        if d.require_known_peers and peer is not None and not peer.accepts_address(address):
            return Rejection(
                RJ_CALLING_AE_NOT_RECOGNIZED, "wrong_host", f"calling AE title known, but from another host than {peer.host}"
            ), []
        if len(self._associations) >= d.max_associations:
            return Rejection(RJ_LOCAL_LIMIT_EXCEEDED, "too_many_associations", "too many associations (dimse.max_associations)"), []
        if peer is not None and peer.max_associations and sum(
            1 for a in self._associations if a.calling_ae.strip() == peer.ae_title
        ) >= peer.max_associations:
            return Rejection(
                RJ_LOCAL_LIMIT_EXCEEDED, "too_many_associations_for_peer",
                f"too many associations from {peer.ae_title} (its max_associations, {peer.max_associations})",
            ), []
        limits = peer.permissions if peer is not None else None
        granted = d.user_identity.user_permissions(identity.user) if identity is not None and identity.verified else None
        if granted is not None:
            limits = granted if limits is None else limits & granted
        if identity is not None and identity.denied:  # a token without the write scopes
            limits = (PERMISSIONS if limits is None else limits) - identity.denied
        # Storage classes a C-GET requester wants to receive (it asks for the SCP role).
        receiving = {r.sop_class_uid for r in rq.roles if r.scp_role}
        results = []
        for pc in rq.contexts:
            proposed = pc.transfer_syntaxes or [""]
            needed = permission_for(pc.abstract_syntax)
            allowed_by = {needed, "get"} if needed == "store" and pc.abstract_syntax in receiving else {needed}
            if limits is not None and needed is not None and not allowed_by & limits:
                # A known peer or a user without this permission: refuse the service up front.
                results.append(pdu.PresentationContextAC(pc.id, pdu.PC_USER_REJECTED, proposed[0]))
                continue
            if is_storage_class(pc.abstract_syntax):
                allowed: frozenset[str] | list[str] = STORAGE_TRANSFER_SYNTAXES
            elif pc.abstract_syntax in self.abstract_syntaxes:
                allowed = self.abstract_syntaxes[pc.abstract_syntax]
            else:
                results.append(pdu.PresentationContextAC(pc.id, pdu.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, proposed[0]))
                continue
            chosen = next((ts for ts in proposed if ts in allowed), None)
            if chosen is None:
                results.append(pdu.PresentationContextAC(pc.id, pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, proposed[0]))
            else:
                results.append(pdu.PresentationContextAC(pc.id, pdu.PC_ACCEPTED, chosen))
        return None, results

    @staticmethod
    def negotiate_roles(rq: pdu.AssociateRQ, accepted: dict[int, AcceptedContext]) -> list[pdu.RoleSelection]:
        """SCP/SCU role selection (PS3.7 D.3.3.4): a C-GET requester asks to be the
        storage SCP for the classes it wants to receive. We agree to what it proposes
        for storage classes we accepted a context for; other proposals get no answer,
        which leaves the default roles."""
        classes = {c.abstract_syntax for c in accepted.values()}
        return [
            pdu.RoleSelection(r.sop_class_uid, r.scu_role, r.scp_role)
            for r in rq.roles
            if r.sop_class_uid in classes and is_storage_class(r.sop_class_uid)
        ]

    # ---- one connection --------------------------------------------------------------

    async def _on_connect(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: ssl.SSLContext | None = None
    ) -> None:
        """One connection, from the A-ASSOCIATE-RQ to its end; on the TLS port (``tls``)
        the handshake comes first, bounded by ``acse_timeout``."""
        peer = writer.get_extra_info("peername") or ("?", 0)
        where = endpoint(str(peer[0]), peer[1])
        if self.connection_cap.full(len(self._live)):
            self.connection_cap.refused(where)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._live.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            # On loopback, Nagle plus delayed ACK costs ~40 ms per C-STORE.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc: Association | None = None
        how = "closed"
        try:
            if is_trusted(address_of(str(peer[0])), networks(self.config.dimse.trusted_proxies)):
                try:
                    source = await read_header(writer, self.config.dimse.acse_timeout)
                except ProxyHeaderError as exc:
                    how = f"aborted (from a dimse.trusted_proxies address: {exc})"
                    return
                except TimeoutError:
                    how = "aborted (no PROXY protocol header within dimse.acse_timeout)"
                    return
                except (asyncio.IncompleteReadError, ConnectionError):
                    how = "closed without a word"
                    return
                if source is not None:
                    where = endpoint(source[0], source[1])  # the client the load balancer passes on
                if tls is None:  # (the TLS port waits for its first byte itself)
                    first = await _first_byte(writer, self.config.dimse.acse_timeout)
                    if first != "sent":
                        # the proxy's health check, header and all; or a client that says nothing
                        how = "closed without a word" if first == "closed" else "aborted (network timeout)"
                        return
                    cast(asyncio.Transport, writer.transport).resume_reading()
            if tls is not None and not await self._start_tls(writer, tls, where):
                return
            assoc = await self._associate(reader, writer, where)
            if assoc is None:
                return
            how = await self._serve(assoc)
        except ProtocolError as exc:
            how = f"aborted (protocol error: {exc})"
            await self._send_abort(writer, 0)
        except pdu.PDUError as exc:
            how = f"aborted (malformed PDU: {exc})"
            await self._send_abort(writer, 2)
        except asyncio.TimeoutError:
            how = "aborted (network timeout)"
            await self._send_abort(writer, 0)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            how = "aborted (connection lost)"
            if assoc is None and isinstance(exc, asyncio.IncompleteReadError) and not exc.partial:
                # Closed before a byte of a PDU: a port check (a load balancer's TCP
                # check every two seconds, monitoring), not a failure worth a warning.
                how = "closed without a word"
        except asyncio.CancelledError:
            how = "aborted (shutdown)"
        except Exception:  # noqa: BLE001 - one association must never take the SCP down
            log.exception("association from %s failed", assoc.peer if assoc else where)
            how = "aborted (internal error)"
        finally:
            if assoc is not None:
                assoc.discard()
                for t in list(assoc.tasks.values()):
                    t.cancel()
                self._associations.discard(assoc)
                self.metrics.associations_open.dec()
                s = assoc.stats
                self.audit.received(
                    assoc.participant(), s.studies, s.stored, s.failed,
                    f"C-STORE to {assoc.called_ae}",
                )
                elapsed = time.monotonic() - s.started
                log.info(
                    "association from %s %s: %d stored, %d failed, %d echo, %.2f s",
                    assoc.peer, how, s.stored, s.failed, s.echoed, elapsed,
                    extra={"fields": {
                        "event": "association", "calling_ae": assoc.calling_ae, "called_ae": assoc.called_ae,
                        "peer": where, "end": how, "stored": s.stored, "failed": s.failed, "echo": s.echoed,
                        "seconds": round(elapsed, 3),
                    }},
                )
            elif how.startswith("aborted"):
                admitted, held = self.unassociated.admit()
                if admitted:
                    log.warning("connection from %s %s before association%s", where, how, left_out(held))
            elif how == "closed without a word":
                log.debug("connection from %s closed without a word (a port check)", where)
            with contextlib.suppress(Exception):
                writer.close()
            self._live.discard(task)

    async def _start_tls(self, writer: asyncio.StreamWriter, context: ssl.SSLContext, where: str) -> bool:
        """The server side of the TLS handshake; a refused one is logged in words and
        counted, and False returned (the connection is then closed). A connection
        closed before its first byte is a port check, as on the plain port: DEBUG only."""
        timeout = self.config.dimse.acse_timeout
        first = await _first_byte(writer, timeout)
        if first == "closed":
            log.debug("connection from %s closed without a word (a port check)", where)
            return False
        refusal: tuple[str, str] | None = ("tls_handshake_failed", "no TLS handshake within dimse.acse_timeout")
        if first == "sent":
            refusal = await _handshake(writer, context, timeout)
        if refusal is None:
            cert = writer.get_extra_info("peercert") or {}
            subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
            log.debug("TLS from %s: %s, client certificate %s", where, writer.get_extra_info("ssl_object").version(), subject or "none")
            return True
        label, why = refusal
        log.warning(
            "TLS connection from %s refused: %s", where, why,
            extra={"fields": {"event": "tls refused", "peer": where, "reason": why}},
        )
        self.audit.refused_node(Participant(f"client {ip_of(where)}", True, ip_of(where)), f"TLS refused: {why}", tls=True)
        self.metrics.associations_rejected.labels(label).inc()
        return False

    @staticmethod
    async def _send_abort(writer: asyncio.StreamWriter, reason: int) -> None:
        """A-ABORT (service provider) with ``reason``, on a connection about to close."""
        with contextlib.suppress(Exception):
            writer.write(pdu.encode_abort(2, reason))
            await drain(writer, ABORT_TIMEOUT)

    async def _associate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, where: str) -> Association | None:
        d = self.config.dimse
        pdu_type, body = await read_pdu(reader, d.acse_timeout, 1 << 16)
        if pdu_type != pdu.A_ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
        rq = pdu.parse_associate_rq(body)
        address = ip_of(where)
        reject, results = self.negotiate(rq, address)
        outcome = Outcome()
        if reject is None and d.user_identity.enabled:
            reject, outcome = await self._identify(rq, address)
            if reject is None:  # with the user's permissions; and a token's check may have waited: limits again
                reject, results = self.negotiate(rq, address, outcome.identity)
        if reject is not None:
            log.warning(
                "association from %s@%s to %s rejected: %s (result %d, source %d, reason %d)",
                rq.calling_ae, where, rq.called_ae, reject.why, *reject.code,
                extra={"fields": {
                    "event": "association rejected", "calling_ae": rq.calling_ae, "called_ae": rq.called_ae,
                    "peer": where, "reason": reject.why,
                }},
            )
            self.metrics.associations_rejected.labels(reject.label).inc()
            self.audit.refused_node(
                dimse_participant(rq.calling_ae, ip_of(where), True), f"association to {rq.called_ae} rejected: {reject.why}",
                tls=False,
            )
            writer.write(pdu.encode_associate_rj(*reject.code))
            await drain(writer, d.acse_timeout)
            return None
        accepted = {
            r.id: AcceptedContext(r.id, pc.abstract_syntax, r.transfer_syntax)
            for r, pc in zip(results, rq.contexts)
            if r.result == pdu.PC_ACCEPTED
        }
        roles = self.negotiate_roles(rq, accepted)
        assoc = Association(
            reader, writer, rq, accepted, self.receive, d.dimse_timeout, self.space_problem,
            metrics=self.metrics, audit=self.audit, address=ip_of(where), where=where, identity=outcome.identity,
        )
        assoc.scp_roles = frozenset(r.sop_class_uid for r in roles if r.scp_role)
        # Counted before the A-ASSOCIATE-AC goes out: another RQ negotiated while it
        # drains must see this slot taken.
        self._associations.add(assoc)
        try:
            writer.write(
                pdu.encode_associate_ac(
                    rq, results, self.max_pdu, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, roles,
                    outcome.reply,
                )
            )
            await drain(writer, d.acse_timeout)
        except BaseException:
            self._associations.discard(assoc)
            raise
        self.metrics.associations.inc()
        self.metrics.associations_open.inc()
        log.info(
            "association accepted from %s (%d of %d contexts%s)", assoc.peer, len(accepted), len(results),
            f", {outcome.identity.describe()}" if outcome.identity else "",
        )
        return assoc

    async def _identify(self, rq: pdu.AssociateRQ, address: str) -> tuple[Rejection | None, Outcome]:
        """The user an A-ASSOCIATE-RQ names, checked (`check_identity`); an address whose
        passcodes or tokens failed ``max_failures_per_minute`` times within a minute has
        its associations that name a user rejected (transient) until the oldest failure
        is a minute old."""
        cfg = self.config.dimse.user_identity
        self.failed_identities.limit = cfg.max_failures_per_minute  # reloadable
        if rq.user_identity is not None and (wait := self.failed_identities.blocked_for(address)):
            why = f"too many failed user identities from {address}; turned away for {wait:.0f} s more"
            return Rejection(RJ_IDENTITY_TRANSIENT, "user_identity_lockout", why), Outcome()
        outcome = await check_identity(rq.user_identity, cfg, self.config.peer(rq.calling_ae), self.token_user)
        if outcome.refusal is None:
            return None, outcome
        if rq.user_identity is not None and outcome.refusal.code == RJ_IDENTITY and self.failed_identities.failed(address):
            log.warning(
                "%s: %d failed user identities within a minute; associations naming a user are turned away for a minute",
                address, cfg.max_failures_per_minute,
            )
        return Rejection(outcome.refusal.code, "user_identity", outcome.refusal.why), outcome

    async def _serve(self, assoc: Association) -> str:
        """Read PDUs until release or abort.

        ``network_timeout`` is an idle timeout: it runs only while no request of the
        association is queued or in progress, since a requester waits silently for its
        C-FIND, C-MOVE or C-GET however long that takes (each write to it is bounded
        by ``dimse_timeout`` instead). Every PDU, and the end of the last request,
        restarts it. PDUs are read all along, so a C-CANCEL reaches a running request.
        """
        d = self.config.dimse
        loop = asyncio.get_running_loop()
        # Slack for the PDU header and a peer that counts the PDV header differently.
        max_length = self.max_pdu + 64
        async with asyncio.timeout(None) as idle:

            def rearm() -> None:
                if not idle.expired():
                    idle.reschedule(None if assoc.busy else loop.time() + d.network_timeout)

            assoc.on_idle = rearm
            try:
                while True:
                    if assoc.queued >= MAX_QUEUED_REQUESTS:
                        await assoc.drain_tasks()
                    rearm()
                    pdu_type, body = await read_pdu(assoc.reader, None, max_length)
                    if assoc.writer.is_closing():
                        # An answer could not be sent: what the peer sent before it left
                        # is not served (it read nothing of 15,000 pipelined requests).
                        raise ConnectionResetError("the connection closed while requests were queued")
                    if pdu_type == pdu.P_DATA_TF:
                        for message in assoc.on_pdata(body):
                            self._route(assoc, message)
                    elif pdu_type == pdu.A_RELEASE_RQ:
                        await assoc.drain_tasks()
                        await assoc.send_raw([pdu.encode_release_rp()])
                        return "released"
                    elif pdu_type == pdu.A_ABORT:
                        return "aborted by peer"
                    else:
                        raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02x} in an established association")
            finally:
                assoc.on_idle = None

    def _route(self, assoc: Association, message: Message) -> None:
        if is_cancel(message):
            assoc.cancel(message)
            return
        if message.command.field & 0x8000:
            assoc.deliver_response(message)  # a C-STORE-RSP to a C-GET sub-operation
            return
        handler = self.handlers.get(message.command.field, _unrecognized)
        assoc.dispatch(message, handler)


async def _first_byte(writer: asyncio.StreamWriter, timeout: float) -> str:
    """Wait, without reading it, for a new connection's first byte: ``"sent"``, or
    ``"closed"`` (before any byte: a load balancer's TCP check), or ``"silent"`` (none
    within ``timeout``). The transport stops reading meanwhile, so the bytes stay in
    the socket for the TLS handshake that follows (`start_tls` resumes reading); the
    wait is on a duplicate of the socket, which the loop lets us watch."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return "sent"
    cast(asyncio.Transport, writer.transport).pause_reading()
    with socket.socket(fileno=os.dup(sock.fileno())) as peek:
        peek.setblocking(False)
        try:
            await asyncio.wait_for(wait_readable(peek), timeout)
        except TimeoutError:
            return "silent"
        try:
            return "sent" if peek.recv(1, socket.MSG_PEEK) else "closed"
        except BlockingIOError:
            return "sent"
        except OSError:  # reset before a byte (HAProxy's checks close so)
            return "closed"


async def _handshake(writer: asyncio.StreamWriter, context: ssl.SSLContext, timeout: float) -> tuple[str, str] | None:
    """The TLS handshake; None when it succeeded, else (metric label, why in words)."""
    try:
        await writer.start_tls(context, ssl_handshake_timeout=timeout)
    except ssl.SSLCertVerificationError as exc:
        return "tls_certificate_refused", f"client certificate not trusted ({exc.verify_message})"
    except ssl.SSLError as exc:
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return "tls_no_client_certificate", "no client certificate (dimse.tls.ca_certificates requires one)"
        return "tls_handshake_failed", f"TLS handshake failed ({exc.reason or exc})"
    except ConnectionAbortedError:  # asyncio's handshake timeout
        return "tls_handshake_failed", "no TLS handshake within dimse.acse_timeout"
    except OSError:
        return "tls_handshake_failed", "connection lost during the TLS handshake"
    return None
