"""The DIMSE SCP: the pynetdicom AE, what it accepts, and its association policy.

pynetdicom serves each association on its own thread; handlers receive their
dependencies bound at construction and never touch the asyncio loop.
"""

from __future__ import annotations

import logging
import socket
import tempfile
import time
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from gateway.config import Config
from gateway.dimse.stats import stats_for
from gateway.dimse.store import StoreHandler
from gateway.spool.queue import Spool

log = logging.getLogger("gateway.dimse")

# Every transfer syntax a modality commonly proposes. Instances are stored exactly as
# received, so accepting a syntax never requires us to decode it.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent)
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


def _set_nodelay(event: evt.Event) -> None:
    """Disable Nagle: on loopback, Nagle plus delayed ACK costs ~40 ms per C-STORE."""
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def _peer_text(assoc: Any) -> str:
    req = assoc.requestor
    return f"{req.ae_title}@{req.address}:{req.port}"


def _on_accepted(event: evt.Event) -> None:
    stats_for(event.assoc)
    log.info("association accepted from %s", _peer_text(event.assoc))


def _on_rejected(event: evt.Event) -> None:
    log.warning("association rejected from %s", _peer_text(event.assoc))


def _summary(event: evt.Event, how: str) -> None:
    stats = stats_for(event.assoc)
    log.info(
        "association from %s %s: %d stored, %d failed, %d echo, %.2f s",
        _peer_text(event.assoc),
        how,
        stats.stored,
        stats.failed,
        stats.echoed,
        time.monotonic() - stats.started,
    )


def _on_released(event: evt.Event) -> None:
    _summary(event, "released")


def _on_aborted(event: evt.Event) -> None:
    _summary(event, "aborted")


def _on_echo(event: evt.Event) -> int:
    stats_for(event.assoc).echoed += 1
    return 0x0000


def build_ae(config: Config, spool: Spool) -> tuple[AE, list[Any]]:
    """The configured AE and its event handlers, not yet listening."""
    # Received data sets go to a file in the spool's incoming/ directory (same file
    # system, so making them durable is a rename), never into memory.
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(spool.incoming)
    # Peers send UIDs and AE titles that pynetdicom would otherwise refuse to decode.
    _config.ENFORCE_UID_CONFORMANCE = False

    d = config.dimse
    ae = AE(ae_title=d.ae_title)
    ae.maximum_pdu_size = d.max_pdu_size
    ae.maximum_associations = d.max_associations
    ae.network_timeout = d.network_timeout
    ae.acse_timeout = d.acse_timeout
    ae.dimse_timeout = d.dimse_timeout
    if d.require_known_peers:
        ae.require_calling_aet = [p.ae_title for p in d.peers]
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)

    handlers = [
        (evt.EVT_CONN_OPEN, _set_nodelay),
        (evt.EVT_ACCEPTED, _on_accepted),
        (evt.EVT_REJECTED, _on_rejected),
        (evt.EVT_RELEASED, _on_released),
        (evt.EVT_ABORTED, _on_aborted),
        (evt.EVT_C_ECHO, _on_echo),
        (evt.EVT_C_STORE, StoreHandler(config, spool)),
    ]
    return ae, handlers


def start_scp(config: Config, spool: Spool) -> ThreadedAssociationServer:
    """Start listening on [dimse] host:port in background threads."""
    ae, handlers = build_ae(config, spool)
    server = ae.start_server(
        (config.dimse.host, config.dimse.port), block=False, evt_handlers=handlers
    )
    assert isinstance(server, ThreadedAssociationServer)
    return server


def stop_scp(server: ThreadedAssociationServer, grace: float) -> None:
    """Stop accepting, let running associations finish for ``grace`` s, then abort them."""
    server.shutdown()
    deadline = time.monotonic() + grace
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    for assoc in server.active_associations:
        log.warning("aborting association from %s at shutdown", _peer_text(assoc))
        assoc.abort()
