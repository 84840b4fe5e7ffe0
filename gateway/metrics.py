"""The gateway's Prometheus collectors, one set per daemon on its own registry.

A leaf: the services in ``dimse/``, ``spool/``, ``retrieval/`` and ``upstream/`` report
into a `Metrics` handed to them, and ``web/`` exposes its registry at ``/metrics``. A
dedicated `CollectorRegistry` (never the process-wide default) keeps two daemons, or
the tests, in one process from sharing or colliding on counters.

Labels stay bounded: DIMSE commands by name, statuses as four hex digits, delivery
outcomes by kind, HTTP statuses as numbers, HTTP routes as their patterns, transfer
syntaxes as UIDs, and calling AE titles as they come (a site has a few dozen
modalities) up to `SENDER_LABELS` distinct ones, the rest as ``other``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: a C-ECHO takes a millisecond, a C-MOVE of a study minutes.
DIMSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
UPSTREAM_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

# Distinct calling AE titles with a label of their own: beyond it, an association storm
# of random AE titles (a scanner, a misconfigured fleet) cannot grow the registry.
SENDER_LABELS = 64
OTHER_SENDERS = "other"

COMMAND_NAMES = {0x0030: "C-ECHO", 0x0001: "C-STORE", 0x0020: "C-FIND", 0x0021: "C-MOVE", 0x0010: "C-GET"}


def command_name(field: int) -> str:
    """The label of a request's Command Field (``other`` for services we do not offer)."""
    return COMMAND_NAMES.get(field & 0x7FFF, "other")


# Why an association (or a TLS connection) is turned away: each series exists from the
# start at 0, so that Prometheus' increase() sees the first rejection of a kind too (a
# series born at 1 shows no increase).
REJECTION_REASONS = (
    "unknown_calling_ae", "unknown_called_ae", "wrong_host", "too_many_associations", "too_many_associations_for_peer",
    "application_context", "pdu_too_small", "tls_no_client_certificate", "tls_certificate_refused", "tls_handshake_failed",
)


class Metrics:
    """Every collector of one gateway, registered on ``registry`` (a new one if None)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.associations_open = Gauge(
            "gateway_dimse_associations_open", "DIMSE associations established now", registry=r
        )
        self.associations = Counter(
            "gateway_dimse_associations", "DIMSE associations accepted", registry=r
        )
        self.associations_rejected = Counter(
            "gateway_dimse_associations_rejected",
            "A-ASSOCIATE-RQs rejected, and TLS connections refused before one, by reason",
            ["reason"],
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.associations_rejected.labels(reason)
        self.connections_refused = Counter(
            "gateway_connections_refused",
            "Connections closed as soon as accepted, the listener's max_connections being open, by listener",
            ["listener"],
            registry=r,
        )
        for listener in ("dimse", "http"):
            self.connections_refused.labels(listener)
        self.dimse_requests = Histogram(
            "gateway_dimse_request_duration_seconds",
            "DIMSE requests from their receipt to their final response, by command and final status",
            ["command", "status"],
            buckets=DIMSE_BUCKETS,
            registry=r,
        )
        self.stores = Counter(
            "gateway_dimse_instances_received",
            "C-STORE requests answered, by calling AE title and result (stored: Success, the"
            " instance durable in the spool; refused: any other status)",
            ["calling_ae", "result"],
            registry=r,
        )
        self.last_stored = Gauge(
            "gateway_dimse_last_stored_timestamp_seconds",
            "When an instance from each calling AE title was last stored (Unix time), to alert"
            " on a modality that went quiet",
            ["calling_ae"],
            registry=r,
        )
        self._senders: set[str] = set()
        self.commitment_instances = Counter(
            "gateway_storage_commitment_instances",
            "Instances a storage commitment request asked about, by result (committed, failed)",
            ["result"],
            registry=r,
        )
        self.commitment_reports = Counter(
            "gateway_storage_commitment_reports",
            "Storage commitment reports (N-EVENT-REPORT), by how they went: on the requester's"
            " association, on a new one to it, or not delivered (given up, or no peer to call)",
            ["via"],
            registry=r,
        )
        self.route_copies = Counter(
            "gateway_route_copies",
            "Copies a route sent on to its destination by C-STORE, by the state each attempt left"
            " them in (delivered; failed: waits for another attempt; dead; withdrawn: its study discarded as it was sent)",
            ["destination", "state"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "gateway_delivery_attempts",
            "Instances sent to the upstream (each attempt of each instance)",
            ["upstream"],
            registry=r,
        )
        self.delivery_outcomes = Counter(
            "gateway_delivery_outcomes",
            "Delivery attempt outcomes: the upstream's verdict (kind) and the spool state it led to",
            ["upstream", "kind", "state"],
            registry=r,
        )
        self.upstream_requests = Histogram(
            "gateway_upstream_request_duration_seconds",
            "Upstream HTTP requests, body read included, by transaction, method and HTTP status"
            " (error: no HTTP answer)",
            ["what", "method", "status"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.http_requests = Histogram(
            "gateway_http_request_duration_seconds",
            "HTTP requests (facade, probes, /metrics) to the end of their answer, by route"
            " pattern, method and status",
            ["route", "method", "status"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self.cache_lookups = Counter(
            "gateway_facade_cache_lookups",
            "Facade cache lookups of a remote upstream's metadata and frames, by kind and result"
            " (the hit ratio is hit / (hit + miss))",
            ["kind", "result"],
            registry=r,
        )
        self.auth_lockouts = Counter(
            "gateway_http_auth_lockouts",
            "Client addresses turned away (429) for presenting wrong credentials"
            " http.auth.max_failures_per_minute times within a minute",
            registry=r,
        )
        self.transcodes = Counter(
            "gateway_transcodes",
            "Instances converted for a receiver, by source and target transfer syntax",
            ["source", "target"],
            registry=r,
        )

    def dimse_request(self, field: int, status: int | None, seconds: float) -> None:
        """One DIMSE request ended; ``status`` None: no final response could be sent."""
        label = "none" if status is None else f"0x{status:04X}"
        self.dimse_requests.labels(command_name(field), label).observe(seconds)

    def store_answered(self, calling_ae: str, stored: bool) -> None:
        """A C-STORE from ``calling_ae`` was answered: Success (``stored``) or not."""
        sender = calling_ae if calling_ae in self._senders else OTHER_SENDERS
        if sender == OTHER_SENDERS and len(self._senders) < SENDER_LABELS:
            self._senders.add(calling_ae)
            sender = calling_ae
        self.stores.labels(sender, "stored" if stored else "refused").inc()
        if stored:
            self.last_stored.labels(sender).set_to_current_time()

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered; ``route`` is its pattern (``/dicom-web/studies/{study}``),
        never the path itself, so UIDs do not become labels."""
        self.http_requests.labels(route, method, str(status)).observe(seconds)

    def upstream_request(self, what: str, method: str, status: int | None, seconds: float) -> None:
        """One upstream HTTP request ended; ``status`` None: it got no HTTP answer."""
        self.upstream_requests.labels(what, method, "error" if status is None else str(status)).observe(seconds)
