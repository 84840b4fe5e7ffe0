"""Typed, frozen configuration loaded from TOML.

Every other module receives a `Config`; none reads TOML itself. Validation happens
once, at start-up, and every message names the offending key so that an admin can
fix the file without reading code. Unknown keys are errors: a typo such as
``ack_mode`` must not silently fall back to a default.

Secrets: any string value written as ``"env:NAME"`` is replaced by the environment
variable NAME (missing variable: an error naming both the key and the variable).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pydicom.uid
from pydicom.datadict import tag_for_keyword

from gateway.codecs.syntaxes import SYNTAXES
from gateway.uids import is_valid_uid

AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash
PERMISSIONS = frozenset({"store", "find", "move", "get"})


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Peer:
    """A remote AE we know: a C-MOVE destination and an allow-list entry."""

    ae_title: str
    host: str
    port: int
    permissions: frozenset[str] = PERMISSIONS
    # The addresses ``host`` resolved to at load: with require_known_peers, an
    # association under this AE title is accepted only from one of them...
    addresses: frozenset[str] = frozenset()
    # ...unless the peer opts out (a modality behind NAT or DHCP).
    any_host: bool = False
    # Associations under this AE title at once (0: only dimse.max_associations), so
    # one modality stuck in a loop cannot take every slot.
    max_associations: int = 0
    # The gateway's associations to it (C-MOVE, routes, commitment reports, peers
    # --echo) use TLS, with [dimse.tls]'s certificate and CAs (`TlsConfig.client_context`).
    tls: bool = False
    # Transfer syntaxes to send it instances in, best first (C-MOVE, routes): proposed
    # first, and an instance is converted to the first the peer accepts that can carry
    # it (a site's WAN link to a remote PACS wants JPEG 2000 lossless, say). Empty: as
    # stored when accepted, else the gateway's own order.
    transfer_syntaxes: tuple[str, ...] = ()
    # Its associations must present a user identity the gateway accepts
    # ([dimse.user_identity]), as every association must with its ``required``.
    require_user_identity: bool = False
    # The user the gateway names in its own associations to it (User Identity
    # Negotiation), by user name alone or with ``passcode``: for a PACS that requires one.
    user: str = ""
    passcode: str = field(default="", repr=False)

    def accepts_address(self, address: str) -> bool:
        """Whether an association under this AE title may come from ``address``."""
        return self.any_host or address.removeprefix("::ffff:") in self.addresses


@dataclass(frozen=True)
class Route:
    """A copy of what is received sent on to another DICOM node (``[[dimse.routes]]``):
    every instance from one of ``calling_ae`` (empty: from anyone, STOW-RS included),
    sent to one of ``called_ae`` (empty: whatever AE title the sender called; set, only
    C-STORE matches: STOW-RS calls none), of one of ``modalities`` and ``sop_classes``
    (each empty: any) is also sent, by C-STORE, to the peer ``destination``, besides
    going to the archive. ``called_ae`` lets a modality pick a destination by the AE
    title it sends to (a second title of the gateway's, such as ``GW_AI``)."""

    destination: str
    calling_ae: frozenset[str] = frozenset()
    sop_classes: frozenset[str] = frozenset()
    modalities: frozenset[str] = frozenset()
    called_ae: frozenset[str] = frozenset()

    def matches(self, calling_ae: str, called_ae: str, sop_class_uid: str, modality: str = "") -> bool:
        return (
            (not self.calling_ae or calling_ae.strip() in self.calling_ae)
            and (not self.called_ae or called_ae.strip() in self.called_ae)
            and (not self.sop_classes or sop_class_uid in self.sop_classes)
            and (not self.modalities or modality in self.modalities)
        )


@dataclass(frozen=True)
class TlsConfig:
    """A TLS listener: our certificate and key and, when ``ca_certificates`` is set, the
    CAs a client certificate must chain to (then one is required). ``port`` and
    ``ca_certificates`` exist under ``[dimse.tls]`` only; ``[http.tls]`` has neither."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    port: int = 0

    def server_context(self) -> ssl.SSLContext:
        """A server context, TLS 1.2 and later only; raises OSError or ssl.SSLError
        when a file cannot be read or does not hold what it should."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.certificate, self.private_key)
        if self.ca_certificates is not None:
            context.load_verify_locations(cafile=self.ca_certificates)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def client_context(self) -> ssl.SSLContext:
        """For associations the gateway requests of a peer with ``tls = true``: TLS 1.2
        and later, our certificate presented as the client's, the peer's certificate
        verified against ``ca_certificates`` (the system's CAs when unset) and its name
        or address against the peer's ``host``. Built once per configuration."""
        return _client_context(self)

    def resolved(self, base: Path) -> TlsConfig:
        """The same with relative paths taken from ``base`` (the config file's directory)."""
        ca = self.ca_certificates
        return TlsConfig(
            (base / self.certificate).resolve(), (base / self.private_key).resolve(),
            (base / ca).resolve() if ca is not None else None, self.port,
        )


@dataclass(frozen=True)
class UserIdentityConfig:
    """``[dimse.user_identity]``: the users an association may name in its A-ASSOCIATE-RQ
    (User Identity Negotiation, PS3.7 D.3.3.7): by user name and passcode, each from
    ``users``, and, with ``jwt``, by an access token of ``[http.auth.oidc]``'s provider.
    ``required``: an association that names no accepted user is rejected."""

    users: tuple[tuple[str, str], ...] = field(default=(), repr=False)  # (user, passcode)
    jwt: bool = False
    required: bool = False
    # Failed passcodes and tokens per address and minute before its associations that
    # name a user are rejected for the rest of that minute (0: no limit).
    max_failures_per_minute: int = 20
    # (user, permissions): what an association of that verified user may do, within
    # its peer's permissions; a user not listed keeps the peer's.
    permissions: tuple[tuple[str, frozenset[str]], ...] = ()

    def user_permissions(self, user: str) -> frozenset[str] | None:
        """The permissions ``permissions`` gives ``user``, None when it gives none."""
        return dict(self.permissions).get(user)

    @property
    def enabled(self) -> bool:
        """Whether any identity can be accepted (else the sub-item is ignored, as the
        standard has an acceptor that does not negotiate user identity do)."""
        return bool(self.users) or self.jwt


@dataclass(frozen=True)
class DimseConfig:
    ae_title: str = "DICOMGW"
    host: str = "0.0.0.0"
    port: int = 11112
    peers: tuple[Peer, ...] = ()
    routes: tuple[Route, ...] = ()
    require_known_peers: bool = False
    check_called_ae: bool = False  # reject associations calling an AE title not ours
    ack: str = "spooled"  # "spooled" | "delivered"
    ack_timeout: float = 60.0
    max_pdu_size: int = 262144
    max_associations: int = 32
    # connections open at once, associations and those not yet associated; past it a
    # new connection is closed as soon as accepted (`gateway.connection_cap`)
    max_connections: int = 256
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    shutdown_grace: float = 10.0
    tls: TlsConfig | None = None  # [dimse.tls]: a second, TLS-only port
    user_identity: UserIdentityConfig = field(default_factory=UserIdentityConfig)
    # load balancers (addresses or networks) whose connections begin with a PROXY
    # protocol header naming the client (HAProxy's send-proxy, send-proxy-v2)
    trusted_proxies: tuple[str, ...] = ()

    @property
    def own_ae_titles(self) -> frozenset[str]:
        """The AE titles the gateway answers to as called AE: ``ae_title`` and every
        route's ``called_ae`` (what ``check_called_ae`` accepts)."""
        return frozenset({self.ae_title}).union(*(r.called_ae for r in self.routes))


@dataclass(frozen=True)
class SpoolConfig:
    directory: Path = Path("/var/lib/dicom-gateway")
    min_free_mb: int = 512
    max_size_mb: int = 0  # 0: no cap on the spool's own files
    max_attempts: int = 20
    max_age_hours: float = 72.0
    batch_max_instances: int = 32
    batch_max_mb: int = 256
    concurrency: int = 4
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 300.0
    retain_delivered_hours: float = 24.0
    batch_linger_ms: int = 200
    busy_timeout: float = 60.0  # seconds a spool database operation waits for a lock
    reserve_mb: int = 64  # blank files kept ready for C-STOREs (0: a new file each)


@dataclass(frozen=True)
class AuthConfig:
    type: str = "none"  # none | basic | bearer | header | oauth2 | azure_managed_identity | google
    username: str = ""
    password: str = ""
    token: str = ""
    name: str = ""
    value: str = ""
    # oauth2: the client credentials grant (RFC 6749 4.4) against ``token_url``;
    # azure_managed_identity: another metadata endpoint, a user-assigned identity
    token_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    scope: str = ""
    client_auth: str = "basic"  # basic (RFC 6749 2.3.1 HTTP Basic) | post (in the form)
    # more form fields some providers want (``resource``, ``audience``), sorted pairs
    params: tuple[tuple[str, str], ...] = ()
    # azure_managed_identity: what the token is for ("": Azure's DICOM service)
    resource: str = ""
    # google: a service account key file; "": Google's default chain (ADC)
    service_account_file: str = ""


# AWS HealthImaging's default quotas (requests/s) of the operations the gateway
# calls, from its developer guide; ``[upstream.rate_limits]`` overrides them where an
# account's quotas were raised (or must be shared with other clients).
HEALTHIMAGING_QUOTAS: dict[str, float] = {
    "GetDICOMInstance": 50,
    "GetDICOMInstanceMetadata": 50,
    "GetDICOMInstanceFrames": 50,
    "GetDICOMSeriesMetadata": 50,
    "GetImageFrame": 1000,
    "GetImageSetMetadata": 50,
    "SearchImageSets": 25,
    "GetImageSet": 25,
}
HEALTHIMAGING_KEYS = (
    "region", "datastore_id", "dicomweb_endpoint_url", "runtime_endpoint_url", "profile", "rate_limits",
    "retrieve_path", "include_non_primary",
)
# How C-MOVE/C-GET read a HealthImaging instance: GetDICOMInstance, or rebuilt from
# GetImageSetMetadata plus GetImageFrame.
HEALTHIMAGING_RETRIEVE_PATHS = ("dicomweb", "frames")
AWS_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
DATASTORE_ID_RE = re.compile(r"^[0-9a-z]{32}$")  # botocore's medical-imaging model
HTTP_URL_RE = re.compile(r"^https?://[^/\s]+")


@dataclass(frozen=True)
class UpstreamConfig:
    type: str = "local"  # local | dicomweb | healthimaging
    url: str = ""
    auth: AuthConfig = field(default_factory=AuthConfig)
    timeout: float = 120.0
    connect_timeout: float = 10.0
    verify_tls: bool = True
    # The largest answer held in memory whole: a search page, a metadata answer, a
    # STOW-RS response, one frame. An archive (or a proxy before it) that sends more is
    # refused, not followed until the daemon runs out of memory.
    max_answer_mb: int = 256
    # type = "healthimaging" only; the endpoints are resolved from the region when not set.
    region: str = ""
    datastore_id: str = ""
    dicomweb_endpoint_url: str = ""
    runtime_endpoint_url: str = ""
    profile: str = ""  # botocore profile; "" for botocore's default chain
    rate_limits: dict[str, float] = field(default_factory=dict)  # operation -> requests/s
    retrieve_path: str = "frames"  # HEALTHIMAGING_RETRIEVE_PATHS; frames measured ~3x faster (bench/healthimaging.py)
    include_non_primary: bool = False  # serve instances of non-primary image sets too


@dataclass(frozen=True)
class FindConfig:
    """C-FIND: how the gateway pages through the archive and bounds an answer."""

    page_size: int = 1000  # QIDO-RS limit per request; at most the archive's own cap
    max_matches: int = 10000  # matches per C-FIND; more ends with 0xA700, never Success
    timeout: float = 30.0  # seconds per upstream search request (page)
    wildcard_unsafe_characters: bool = True  # see gateway.dicomweb.qido
    # Keys never sent as QIDO match parameters, only matched by the gateway: attributes
    # archives compute per study/series, where matching support is spotty (Orthanc 1.10
    # returns nothing past the first page when paging a ModalitiesInStudy search).
    local_match_keys: tuple[str, ...] = (
        "ModalitiesInStudy",
        "SOPClassesInStudy",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
        "NumberOfSeriesRelatedInstances",
    )


@dataclass(frozen=True)
class RetrieveConfig:
    """C-MOVE and C-GET: how instances are fetched from the archive and reported."""

    fetch_concurrency: int = 8  # parallel WADO-RS requests per retrieval
    pending_every: int = 10  # a Pending response at least every this many sub-operations...
    pending_seconds: float = 2.0  # ... or this many seconds
    spill_mb: float = 32.0  # instances larger than this wait on disk, not in memory
    allow_lossy: bool = False  # may a lossless instance be sent lossy when nothing else is accepted?
    transcode_mb: float = 256.0  # memory the concurrent transcodes may hold together (estimated)


@dataclass(frozen=True)
class OidcConfig:
    """Access tokens of an OpenID Connect provider, accepted as the facade's Bearer
    credentials: signed with a key the provider publishes, from ``issuer``, for one of
    ``audience``, unexpired, carrying every one of ``required_scopes``."""

    issuer: str
    audience: tuple[str, ...]
    jwks_uri: str = ""  # "": from the issuer's discovery document
    required_scopes: tuple[str, ...] = ()
    write_scopes: tuple[str, ...] = ()  # also needed to store (STOW-RS, PUT) and DELETE
    username_claim: str = "preferred_username"  # who the audit trail names (else "sub")
    verify_tls: bool = True  # verify the provider's certificate when fetching its keys


@dataclass(frozen=True)
class HttpAuthConfig:
    """Who may use the DICOMweb facade: any one matching credential admits a request.
    None configured means open, which ``parse_config`` allows only on a loopback
    ``http.host`` unless ``allow_anonymous`` says so explicitly."""

    bearer_tokens: tuple[str, ...] = ()
    api_key_header: str = "apikey"
    api_keys: tuple[str, ...] = ()
    basic_users: tuple[tuple[str, str], ...] = ()  # (user, password)
    allow_anonymous: bool = False
    oidc: OidcConfig | None = None
    # Requests presenting wrong credentials from one address within a minute before it
    # is turned away (429) for the rest of that minute; 0: no limit.
    max_failures_per_minute: int = 20

    @property
    def open(self) -> bool:
        """No credential configured: every request is admitted."""
        return not (self.bearer_tokens or self.api_keys or self.basic_users or self.oidc)


@dataclass(frozen=True)
class HttpCacheConfig:
    """The facade's on-disk cache of frames and metadata fetched from a remote upstream
    (never the embedded archive, which is on disk already)."""

    max_mb: float = 256.0  # size bound, least recently used entries evicted first; 0: no cache
    directory: str = ""  # "" = <spool.directory>/facade-cache; earlier entries removed at start
    metadata_seconds: float = 60.0  # study/series metadata reused this long (instances may be added)
    client_max_age: int = 3600  # Cache-Control max-age for frames and instance metadata


@dataclass(frozen=True)
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = "/dicom-web"  # DICOMweb root (also served under /v1, /v2, ...)
    cors_origins: tuple[str, ...] = ()  # origins answered with CORS headers; "*" for any
    cache: HttpCacheConfig = field(default_factory=HttpCacheConfig)
    auth: HttpAuthConfig = field(default_factory=HttpAuthConfig)
    tls: TlsConfig | None = None  # [http.tls]: HTTPS instead of HTTP
    read_only: bool = False  # the facade refuses STOW-RS, PUT and DELETE (405)
    compress: bool = True  # gzip QIDO-RS and metadata JSON for clients that accept it
    # seconds a connection may send nothing: idle between requests, before a request's
    # headers are complete, or within its body (STOW-RS: cut off with 408)
    idle_timeout: float = 60.0
    # connections open at once; past it a new one is closed as soon as accepted
    max_connections: int = 1024
    # reverse proxies (addresses or networks) whose X-Forwarded-For/-Proto/-Host say
    # who the client is; from anyone else those headers are ignored
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    # DEBUG lines that may quote patient data (archive error bodies) are dropped unless
    # this is on: a switch for a debugging session, never for production.
    include_patient_data: bool = False


@dataclass(frozen=True)
class AuditConfig:
    """``[audit]``: the audit trail a security review asks for, as DICOM audit
    messages (PS3.15 A.5) sent to an Audit Record Repository by syslog (IHE ATNA) and/or
    appended to a file; neither set: no audit trail. ``syslog``: ``udp://host:514``
    (RFC 5426), ``tcp://host:601`` or ``tls://host:6514`` (RFC 5425; the node's
    certificate is ``[dimse.tls]``'s when configured, as for peers). ``source_id``:
    AuditSourceID (default: ``dimse.ae_title``)."""

    syslog: str = ""
    file: Path | None = None
    source_id: str = ""
    enterprise_site_id: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.syslog) or self.file is not None


@dataclass(frozen=True)
class Config:
    dimse: DimseConfig = field(default_factory=DimseConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    find: FindConfig = field(default_factory=FindConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def peer_tls(self, peer: Peer) -> ssl.SSLContext | None:
        """The client context for associations to ``peer`` (None: plain TCP)."""
        return self.dimse.tls.client_context() if peer.tls and self.dimse.tls is not None else None

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title (trailing spaces ignored)."""
        wanted = ae_title.strip()
        return next((p for p in self.dimse.peers if p.ae_title == wanted), None)


class _Reader:
    """Reads one TOML table, collecting problems instead of stopping at the first."""

    def __init__(self, table: Any, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        if not isinstance(table, dict):
            problems.append(f"{path}: expected a table, got {type(table).__name__}")
            table = {}
        self.table: dict[str, Any] = table
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _raw(self, key: str) -> Any:
        self.seen.add(key)
        value = self.table.get(key)
        if isinstance(value, str) and value.startswith("env:"):
            name = value[4:]
            if name not in os.environ:
                self.problems.append(f"{self._key(key)}: environment variable {name} is not set")
                return None
            return os.environ[name]
        return value

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.problems.append(f"{self._key(key)}: expected a string, got {value!r}")
            return default
        if choices and value not in choices:
            self.problems.append(
                f"{self._key(key)}: {value!r} is not one of {', '.join(repr(c) for c in choices)}"
            )
            return default
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problems.append(
                f"{self._key(key)}: expected an integer from {low} to {high}, got {value!r}"
            )
            return default
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._raw(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            self.problems.append(
                f"{self._key(key)}: expected a number from {low:g} to {high:g}, got {value!r}"
            )
            return default
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.problems.append(f"{self._key(key)}: expected true or false, got {value!r}")
            return default
        return value

    def ae_title(self, key: str, default: str) -> str:
        value = self.string(key, default)
        if not AE_TITLE_RE.match(value) or not value.strip():
            self.problems.append(
                f"{self._key(key)}: {value!r} is not a valid AE title "
                "(1 to 16 printable ASCII characters, no backslash, not all spaces)"
            )
            return default
        return value.strip()

    def sub(self, key: str) -> _Reader:
        self.seen.add(key)
        return _Reader(self.table.get(key, {}), self._key(key), self.problems)

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.seen):
            self.problems.append(f"{self._key(key)}: unknown key")


@functools.lru_cache(maxsize=4)
def _client_context(tls: TlsConfig) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.private_key)
    if tls.ca_certificates is not None:
        context.load_verify_locations(cafile=tls.ca_certificates)
    else:
        context.load_default_certs()
    return context


def _peer(reader: _Reader) -> Peer:
    ae = reader.ae_title("ae_title", "")
    host = reader.string("host", "")
    if not host:
        reader.problems.append(f"{reader.path}.host: required")
    port = reader.integer("port", 104, 1, 65535)
    if "port" not in reader.table:
        reader.problems.append(f"{reader.path}.port: required")
    raw = reader._raw("permissions")
    permissions = PERMISSIONS
    if raw is not None:
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            reader.problems.append(f"{reader.path}.permissions: expected a list of strings")
        elif unknown := set(raw) - PERMISSIONS:
            reader.problems.append(
                f"{reader.path}.permissions: unknown {sorted(unknown)}; allowed: {sorted(PERMISSIONS)}"
            )
        else:
            permissions = frozenset(raw)
    any_host = reader.boolean("any_host", False)
    max_associations = reader.integer("max_associations", 0, 0, 1000)
    tls = reader.boolean("tls", False)
    require_user_identity = reader.boolean("require_user_identity", False)
    user, passcode = reader.string("user", ""), reader.string("passcode", "")
    if passcode and not user:
        reader.problems.append(f"{reader.path}.passcode: needs a user")
    syntaxes: list[str] = []
    for name in _strings(reader, "transfer_syntaxes"):
        uid = name if is_valid_uid(name) else str(getattr(pydicom.uid, name, ""))
        info = SYNTAXES.get(pydicom.uid.UID(uid)) if uid else None
        if info is None or not info.can_encode:
            reader.problems.append(f"{reader.path}.transfer_syntaxes: {name!r} is not a transfer syntax the gateway can write")
        elif uid not in syntaxes:
            syntaxes.append(uid)
    addresses: frozenset[str] = frozenset()
    if host:
        try:
            addresses = frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None))
        except OSError as exc:
            reader.problems.append(f"{reader.path}.host: cannot resolve {host!r} ({exc.strerror or exc})")
    reader.finish()
    return Peer(
        ae, host, port, permissions, addresses, any_host, max_associations, tls, tuple(syntaxes), require_user_identity,
        user, passcode,
    )


def _dimse(r: _Reader) -> DimseConfig:
    d = DimseConfig()
    peers_raw = r._raw("peers") or []
    peers: list[Peer] = []
    if not isinstance(peers_raw, list):
        r.problems.append("dimse.peers: expected an array of tables ([[dimse.peers]])")
    else:
        for i, item in enumerate(peers_raw):
            peers.append(_peer(_Reader(item, f"dimse.peers[{i}]", r.problems)))
    titles = [p.ae_title for p in peers]
    for dup in sorted({t for t in titles if titles.count(t) > 1}):
        r.problems.append(f"dimse.peers: AE title {dup!r} is listed more than once")
    cfg = DimseConfig(
        ae_title=r.ae_title("ae_title", d.ae_title),
        host=r.string("host", d.host),
        port=r.integer("port", d.port, 1, 65535),
        peers=tuple(peers),
        routes=_routes(r, {p.ae_title for p in peers}),
        require_known_peers=r.boolean("require_known_peers", d.require_known_peers),
        check_called_ae=r.boolean("check_called_ae", d.check_called_ae),
        ack=r.string("ack", d.ack, ("spooled", "delivered")),
        ack_timeout=r.number("ack_timeout", d.ack_timeout, 1, 3600),
        max_pdu_size=r.integer("max_pdu_size", d.max_pdu_size, 0, 2**31 - 1),
        max_associations=r.integer("max_associations", d.max_associations, 1, 1000),
        max_connections=r.integer("max_connections", d.max_connections, 2, 100000),
        network_timeout=r.number("network_timeout", d.network_timeout, 1, 3600),
        acse_timeout=r.number("acse_timeout", d.acse_timeout, 1, 3600),
        dimse_timeout=r.number("dimse_timeout", d.dimse_timeout, 1, 3600),
        shutdown_grace=r.number("shutdown_grace", d.shutdown_grace, 0, 3600),
        tls=_tls(r, dimse=True),
        user_identity=_user_identity(r.sub("user_identity")),
        trusted_proxies=_networks(r, "trusted_proxies"),
    )
    for i, p in enumerate(peers):
        if p.require_user_identity and not cfg.user_identity.enabled:
            r.problems.append(
                f"dimse.peers[{i}].require_user_identity: needs [dimse.user_identity] users or jwt = true"
            )
        if p.tls and cfg.tls is None:
            r.problems.append(
                f"dimse.peers[{i}].tls: needs [dimse.tls] (its certificate is presented to the peer, its"
                " ca_certificates verify the peer's)"
            )
    if cfg.tls is not None and cfg.tls.port == cfg.port:
        r.problems.append(f"dimse.tls.port: {cfg.port} is dimse.port already; TLS needs a port of its own")
    if cfg.max_connections <= cfg.max_associations:
        r.problems.append(
            f"dimse.max_connections: {cfg.max_connections} leaves no room beyond dimse.max_associations"
            f" ({cfg.max_associations}) for an association to be answered, or rejected"
        )
    r.finish()
    return cfg


def _user_identity(r: _Reader) -> UserIdentityConfig:
    """``[dimse.user_identity]``: ``users`` a table of user = passcode (each may be
    ``env:NAME``, as every secret), ``jwt`` and ``required`` booleans,
    ``max_failures_per_minute``, and ``permissions`` a table of user = [permissions]."""
    users: list[tuple[str, str]] = []
    raw = r._raw("users")
    if raw is not None and not isinstance(raw, dict):
        r.problems.append(f"{r._key('users')}: expected a table of user = passcode")
    elif raw is not None:
        table = _Reader(raw, r._key("users"), r.problems)
        for user in raw:
            passcode = table.string(user, "")
            if not passcode:
                r.problems.append(f"{table._key(user)}: expected a passcode")
            else:
                users.append((user, passcode))
    permissions: list[tuple[str, frozenset[str]]] = []
    raw = r._raw("permissions")
    if raw is not None and not isinstance(raw, dict):
        r.problems.append(f"{r._key('permissions')}: expected a table of user = [permissions]")
    elif raw is not None:
        for user, granted in raw.items():
            if not isinstance(granted, list) or not set(granted) <= PERMISSIONS or not all(isinstance(g, str) for g in granted):
                r.problems.append(f"{r._key('permissions')}.{user}: expected a list of {', '.join(sorted(PERMISSIONS))}")
            else:
                permissions.append((user, frozenset(granted)))
    cfg = UserIdentityConfig(
        tuple(users), r.boolean("jwt", False), r.boolean("required", False),
        r.integer("max_failures_per_minute", UserIdentityConfig.max_failures_per_minute, 0, 1_000_000),
        tuple(permissions),
    )
    if cfg.required and not cfg.enabled:
        r.problems.append(f"{r._key('required')}: no identity could ever be accepted; set users or jwt = true")
    r.finish()
    return cfg


def _routes(r: _Reader, peers: set[str]) -> tuple[Route, ...]:
    """``[[dimse.routes]]``: each names a configured peer (its address is where the
    copies go) and what it takes; SOP classes by UID or by pydicom keyword
    (``CTImageStorage``)."""
    raw = r._raw("routes") or []
    if not isinstance(raw, list):
        r.problems.append("dimse.routes: expected an array of tables ([[dimse.routes]])")
        return ()
    routes: list[Route] = []
    for i, item in enumerate(raw):
        reader = _Reader(item, f"dimse.routes[{i}]", r.problems)
        destination = reader.ae_title("destination", "") if "destination" in reader.table else ""
        if "destination" not in reader.table:
            r.problems.append(f"{reader.path}.destination: required")
        elif destination and destination not in peers:
            r.problems.append(
                f"{reader.path}.destination: {destination!r} is not a [[dimse.peers]] AE title (its host and port are where copies go)"
            )
        callers = frozenset(_strings(reader, "calling_ae"))
        called = frozenset(_strings(reader, "called_ae"))
        for key, titles in (("calling_ae", callers), ("called_ae", called)):
            for title in sorted(titles):
                if not AE_TITLE_RE.match(title):
                    r.problems.append(f"{reader.path}.{key}: {title!r} is not a valid AE title")
        classes: set[str] = set()
        for name in _strings(reader, "sop_classes"):
            uid = name if is_valid_uid(name) else getattr(pydicom.uid, name, None)
            if is_valid_uid(name) or (isinstance(uid, pydicom.uid.UID) and uid.type == "SOP Class"):
                classes.add(str(uid))
            else:
                r.problems.append(f"{reader.path}.sop_classes: {name!r} is neither a UID nor a SOP class keyword")
        modalities = frozenset(_strings(reader, "modalities"))
        for code in sorted(modalities):
            if not re.fullmatch(r"[A-Z0-9_ ]{1,16}", code):
                r.problems.append(f"{reader.path}.modalities: {code!r} is not a Modality code (CS: CT, MR, US...)")
        reader.finish()
        routes.append(Route(
            destination, frozenset(t.strip() for t in callers), frozenset(classes), modalities,
            frozenset(t.strip() for t in called),
        ))
    return tuple(routes)


def _tls(r: _Reader, dimse: bool) -> TlsConfig | None:
    """``[dimse.tls]`` (``dimse``) or ``[http.tls]``, None when the table is absent."""
    if "tls" not in r.table:
        return None
    t = r.sub("tls")
    required = ("port", "certificate", "private_key") if dimse else ("certificate", "private_key")
    for key in required:
        if key not in t.table:
            t.problems.append(f"{t.path}.{key}: required")
    certificate = t.string("certificate", "")
    private_key = t.string("private_key", "")
    ca_certificates = t.string("ca_certificates", "") if dimse else ""
    port = t.integer("port", 0, 1, 65535) if dimse else 0
    t.finish()
    return TlsConfig(Path(certificate), Path(private_key), Path(ca_certificates) if ca_certificates else None, port)


def _spool(r: _Reader) -> SpoolConfig:
    d = SpoolConfig()
    cfg = SpoolConfig(
        directory=Path(r.string("directory", str(d.directory))),
        min_free_mb=r.integer("min_free_mb", d.min_free_mb, 0, 2**40),
        max_size_mb=r.integer("max_size_mb", d.max_size_mb, 0, 2**40),
        max_attempts=r.integer("max_attempts", d.max_attempts, 1, 10**6),
        max_age_hours=r.number("max_age_hours", d.max_age_hours, 0.001, 24 * 365 * 10),
        batch_max_instances=r.integer("batch_max_instances", d.batch_max_instances, 1, 10000),
        batch_max_mb=r.integer("batch_max_mb", d.batch_max_mb, 1, 100000),
        concurrency=r.integer("concurrency", d.concurrency, 1, 256),
        retry_base_seconds=r.number("retry_base_seconds", d.retry_base_seconds, 0.01, 86400),
        retry_max_seconds=r.number("retry_max_seconds", d.retry_max_seconds, 0.01, 86400),
        batch_linger_ms=r.integer("batch_linger_ms", d.batch_linger_ms, 0, 60000),
        busy_timeout=r.number("busy_timeout", d.busy_timeout, 0.01, 3600),
        reserve_mb=r.integer("reserve_mb", d.reserve_mb, 0, 2**20),
        retain_delivered_hours=r.number(
            "retain_delivered_hours", d.retain_delivered_hours, 0, 24 * 365 * 10
        ),
    )
    r.finish()
    return cfg


def _auth(r: _Reader) -> AuthConfig:
    kind = r.string("type", "none", ("none", "basic", "bearer", "header", "oauth2", "azure_managed_identity", "google"))
    params = r.sub("params")
    cfg = AuthConfig(
        type=kind,
        username=r.string("username", ""),
        password=r.string("password", ""),
        token=r.string("token", ""),
        name=r.string("name", ""),
        value=r.string("value", ""),
        token_url=r.string("token_url", ""),
        client_id=r.string("client_id", ""),
        client_secret=r.string("client_secret", ""),
        scope=r.string("scope", ""),
        client_auth=r.string("client_auth", "basic", ("basic", "post")),
        params=tuple(sorted((key, params.string(key, "")) for key in params.table)),
        service_account_file=r.string("service_account_file", ""),
        resource=r.string("resource", ""),
    )
    params.finish()
    needed = {
        "basic": ("username", "password"),
        "bearer": ("token",),
        "header": ("name", "value"),
        "oauth2": ("token_url", "client_id", "client_secret"),
    }
    for key in needed.get(kind, ()):
        if not getattr(cfg, key):
            r.problems.append(f"{r.path}.{key}: required when {r.path}.type = {kind!r}")
    azure = "azure_managed_identity"
    owners = {
        **dict.fromkeys(("client_secret", "scope", "client_auth", "params"), ("oauth2",)),
        "token_url": ("oauth2", azure), "client_id": ("oauth2", azure), "resource": (azure,),
        "service_account_file": ("google",),
    }
    for key, types in owners.items():
        if key in r.table and kind not in types:
            r.problems.append(f"{r.path}.{key}: only used with {r.path}.type = {' or '.join(repr(t) for t in types)}")
    if cfg.token_url and not HTTP_URL_RE.match(cfg.token_url):
        r.problems.append(f"{r.path}.token_url: {cfg.token_url!r} is not an http(s) URL")
    reserved = {"grant_type", "client_id", "client_secret", "scope"} & {key for key, _ in cfg.params}
    for key in sorted(reserved):
        r.problems.append(f"{r.path}.params.{key}: set by the gateway (use {r.path}.{key} where there is one)")
    r.finish()
    return cfg


def _upstream(r: _Reader) -> UpstreamConfig:
    d = UpstreamConfig()
    kind = r.string("type", d.type, ("local", "dicomweb", "healthimaging"))
    url = r.string("url", d.url).rstrip("/")
    if kind == "dicomweb" and not HTTP_URL_RE.match(url):
        r.problems.append(
            f"upstream.url: {url!r} is not an http(s) URL (required when upstream.type = 'dicomweb')"
        )
    aws: dict[str, Any] = {}
    if kind == "healthimaging":
        aws = _healthimaging(r)
        for key in ("url", "auth"):
            if key in r.table:
                r.seen.add(key)
                r.problems.append(
                    f"upstream.{key}: not used with upstream.type = 'healthimaging' "
                    "(the endpoints come from upstream.region, credentials from botocore's chain)"
                )
    else:
        for key in HEALTHIMAGING_KEYS:
            if key in r.table:
                r.seen.add(key)
                r.problems.append(f"upstream.{key}: only used with upstream.type = 'healthimaging'")
    cfg = UpstreamConfig(
        type=kind,
        url=url,
        auth=_auth(r.sub("auth")) if kind != "healthimaging" else AuthConfig(),
        timeout=r.number("timeout", d.timeout, 0.1, 86400),
        connect_timeout=r.number("connect_timeout", d.connect_timeout, 0.1, 3600),
        verify_tls=r.boolean("verify_tls", d.verify_tls),
        max_answer_mb=r.integer("max_answer_mb", d.max_answer_mb, 1, 2**20),
        **aws,
    )
    r.finish()
    return cfg


def _healthimaging(r: _Reader) -> dict[str, Any]:
    """The ``[upstream]`` keys of an AWS HealthImaging data store."""
    region = r.string("region", "")
    if not region:
        r.problems.append("upstream.region: required when upstream.type = 'healthimaging' (e.g. \"us-east-1\")")
    elif not AWS_REGION_RE.match(region):
        r.problems.append(f"upstream.region: {region!r} is not an AWS region name such as 'us-east-1'")
    datastore_id = r.string("datastore_id", "")
    if not datastore_id:
        r.problems.append("upstream.datastore_id: required when upstream.type = 'healthimaging'")
    elif not DATASTORE_ID_RE.match(datastore_id):
        r.problems.append(f"upstream.datastore_id: {datastore_id!r} is not a data store ID (32 lower-case letters and digits)")
    endpoints = {}
    for key, host in (("dicomweb_endpoint_url", "dicom"), ("runtime_endpoint_url", "runtime")):
        value = r.string(key, "").rstrip("/")
        if value and not HTTP_URL_RE.match(value):
            r.problems.append(f"upstream.{key}: {value!r} is not an http(s) URL")
        endpoints[key] = value or f"https://{host}-medical-imaging.{region}.amazonaws.com"
    limits = r.sub("rate_limits")
    rate_limits = {op: limits.number(op, quota, 0.001, 1e6) for op, quota in HEALTHIMAGING_QUOTAS.items()}
    limits.finish()
    return {
        "region": region,
        "datastore_id": datastore_id,
        "profile": r.string("profile", ""),
        "rate_limits": rate_limits,
        "retrieve_path": r.string("retrieve_path", UpstreamConfig.retrieve_path, HEALTHIMAGING_RETRIEVE_PATHS),
        "include_non_primary": r.boolean("include_non_primary", UpstreamConfig.include_non_primary),
        **endpoints,
    }


def _find(r: _Reader) -> FindConfig:
    d = FindConfig()
    cfg = FindConfig(
        page_size=r.integer("page_size", d.page_size, 1, 100000),
        max_matches=r.integer("max_matches", d.max_matches, 1, 10**7),
        timeout=r.number("timeout", d.timeout, 0.1, 3600),
        wildcard_unsafe_characters=r.boolean("wildcard_unsafe_characters", d.wildcard_unsafe_characters),
        local_match_keys=_keywords(r, "local_match_keys", d.local_match_keys),
    )
    r.finish()
    return cfg


def _retrieve(r: _Reader) -> RetrieveConfig:
    d = RetrieveConfig()
    cfg = RetrieveConfig(
        fetch_concurrency=r.integer("fetch_concurrency", d.fetch_concurrency, 1, 256),
        pending_every=r.integer("pending_every", d.pending_every, 1, 100000),
        pending_seconds=r.number("pending_seconds", d.pending_seconds, 0.1, 3600),
        spill_mb=r.number("spill_mb", d.spill_mb, 0, 100000),
        allow_lossy=r.boolean("allow_lossy", d.allow_lossy),
        transcode_mb=r.number("transcode_mb", d.transcode_mb, 1, 1000000),
    )
    r.finish()
    return cfg


def _networks(r: _Reader, key: str) -> tuple[str, ...]:
    """A list of IP addresses or networks (``trusted_proxies``)."""
    entries = _strings(r, key)
    for entry in entries:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            r.problems.append(f"{r._key(key)}: {entry!r} is not an IP address or network")
    return entries


def _strings(r: _Reader, key: str) -> tuple[str, ...]:
    """A list of strings, each of which may be ``"env:NAME"`` (secrets)."""
    raw = r._raw(key)
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        r.problems.append(f"{r._key(key)}: expected a list of strings")
        return ()
    out: list[str] = []
    for value in raw:
        if value.startswith("env:"):
            if value[4:] not in os.environ:
                r.problems.append(f"{r._key(key)}: environment variable {value[4:]} is not set")
                continue
            value = os.environ[value[4:]]
        if not value:
            r.problems.append(f"{r._key(key)}: empty value")
            continue
        out.append(value)
    return tuple(out)


def _http_cache(r: _Reader) -> HttpCacheConfig:
    d = HttpCacheConfig()
    cfg = HttpCacheConfig(
        max_mb=r.number("max_mb", d.max_mb, 0, 1 << 30),
        directory=r.string("directory", d.directory),
        metadata_seconds=r.number("metadata_seconds", d.metadata_seconds, 0, 86400 * 365),
        client_max_age=r.integer("client_max_age", d.client_max_age, 0, 86400 * 365),
    )
    r.finish()
    return cfg


def _oidc(r: _Reader) -> OidcConfig:
    """``[http.auth.oidc]``: an issuer and audience are required, or any token of the
    provider (for any of its applications) would open the facade."""
    issuer = r.string("issuer", "").rstrip("/")
    if not HTTP_URL_RE.match(issuer):
        r.problems.append(f"{r.path}.issuer: required, the provider's issuer URL (e.g. https://sso.example/realms/hospital)")
    audience = _strings(r, "audience") if isinstance(r.table.get("audience"), list) else (r.string("audience", ""),)
    if not any(audience):
        r.problems.append(f"{r.path}.audience: required, the audience (aud) the provider puts in tokens for the facade")
    jwks_uri = r.string("jwks_uri", "")
    if jwks_uri and not HTTP_URL_RE.match(jwks_uri):
        r.problems.append(f"{r.path}.jwks_uri: {jwks_uri!r} is not an http(s) URL")
    cfg = OidcConfig(
        issuer=issuer,
        audience=tuple(a for a in audience if a),
        jwks_uri=jwks_uri,
        required_scopes=_strings(r, "required_scopes"),
        write_scopes=_strings(r, "write_scopes"),
        username_claim=r.string("username_claim", OidcConfig.username_claim),
        verify_tls=r.boolean("verify_tls", OidcConfig.verify_tls),
    )
    r.finish()
    return cfg


def _http(r: _Reader) -> HttpConfig:
    d = HttpConfig()
    host = r.string("host", d.host)
    base_path = "/" + r.string("base_path", d.base_path).strip("/")
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", base_path) or "//" in base_path:
        r.problems.append(f"http.base_path: {base_path!r} is not a URL path")
    a = r.sub("auth")
    users_raw = a._raw("basic_users")
    users: list[tuple[str, str]] = []
    if users_raw is not None:
        if not isinstance(users_raw, dict):
            a.problems.append("http.auth.basic_users: expected a table of user = password")
        else:
            users_r = _Reader(users_raw, "http.auth.basic_users", r.problems)
            for user in users_raw:
                password = users_r.string(user, "")
                if not password or ":" in user:
                    r.problems.append(f"http.auth.basic_users.{user}: expected a user without ':' and a password")
                else:
                    users.append((user, password))
    auth = HttpAuthConfig(
        bearer_tokens=_strings(a, "bearer_tokens"),
        api_key_header=a.string("api_key_header", HttpAuthConfig.api_key_header).strip().lower(),
        api_keys=_strings(a, "api_keys"),
        basic_users=tuple(users),
        allow_anonymous=a.boolean("allow_anonymous", HttpAuthConfig.allow_anonymous),
        oidc=_oidc(a.sub("oidc")) if "oidc" in a.table else None,
        max_failures_per_minute=a.integer("max_failures_per_minute", HttpAuthConfig.max_failures_per_minute, 0, 1_000_000),
    )
    a.finish()
    if auth.open and not auth.allow_anonymous and not _is_loopback(host):
        r.problems.append(
            f"http.auth: no credentials configured and http.host {host!r} is not loopback; "
            "set bearer_tokens, api_keys, basic_users or [http.auth.oidc], or allow_anonymous = true"
        )
    cfg = HttpConfig(
        host=host,
        port=r.integer("port", d.port, 0, 65535),
        base_path=base_path.rstrip("/") or "/",
        cors_origins=_strings(r, "cors_origins"),
        cache=_http_cache(r.sub("cache")),
        auth=auth,
        tls=_tls(r, dimse=False),
        read_only=r.boolean("read_only", d.read_only),
        compress=r.boolean("compress", d.compress),
        idle_timeout=r.number("idle_timeout", d.idle_timeout, 1, 3600),
        max_connections=r.integer("max_connections", d.max_connections, 1, 100000),
        trusted_proxies=_networks(r, "trusted_proxies"),
    )
    r.finish()
    return cfg


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _keywords(r: _Reader, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """A list of DICOM keywords, each checked against the data dictionary."""
    raw = r._raw(key)
    if raw is None:
        return default
    if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
        r.problems.append(f"{r._key(key)}: expected a list of DICOM keywords")
        return default
    unknown = [k for k in raw if tag_for_keyword(k) is None]
    if unknown:
        r.problems.append(f"{r._key(key)}: not DICOM keywords: {', '.join(unknown)}")
        return default
    return tuple(raw)


def parse_config(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    problems: list[str] = []
    root = _Reader(data, "", problems)
    dimse = _dimse(root.sub("dimse"))
    spool = _spool(root.sub("spool"))
    upstream = _upstream(root.sub("upstream"))
    find = _find(root.sub("find"))
    retrieve = _retrieve(root.sub("retrieve"))
    http = _http(root.sub("http"))
    log_r = root.sub("logging")
    logging_cfg = LoggingConfig(
        level=log_r.string("level", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
        include_patient_data=log_r.boolean("include_patient_data", False),
    )
    log_r.finish()
    audit = _audit(root.sub("audit"))
    root.finish()
    if dimse.user_identity.jwt and http.auth.oidc is None:
        problems.append("dimse.user_identity.jwt: needs [http.auth.oidc], whose provider the tokens are checked against")
    for i, peer in enumerate(dimse.peers):
        lossy = [ts for ts in peer.transfer_syntaxes if not SYNTAXES[pydicom.uid.UID(ts)].encode_lossless]
        if lossy and not retrieve.allow_lossy:
            problems.append(
                f"dimse.peers[{i}].transfer_syntaxes: {', '.join(lossy)} would lose pixel data; it needs retrieve.allow_lossy = true"
            )
    if problems:
        raise ConfigError(problems)
    return Config(
        dimse=dimse, spool=spool, upstream=upstream, http=http, logging=logging_cfg, find=find,
        retrieve=retrieve, audit=audit,
    )


def _audit(r: _Reader) -> AuditConfig:
    syslog = r.string("syslog", "")
    if syslog:
        scheme, _, rest = syslog.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme not in ("udp", "tcp", "tls") or not host or not port.isdigit() or not 0 < int(port) < 65536:
            r.problems.append(f"audit.syslog: {syslog!r} is not udp://, tcp:// or tls:// with a host and port")
    file = r.string("file", "")
    cfg = AuditConfig(
        syslog=syslog, file=Path(file) if file else None, source_id=r.string("source_id", ""),
        enterprise_site_id=r.string("enterprise_site_id", ""),
    )
    r.finish()
    return cfg


def load_config(path: str | Path) -> Config:
    """Read and validate a TOML file; relative spool paths resolve against the file."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    cfg = parse_config(data)
    if not cfg.spool.directory.is_absolute():
        spool = SpoolConfig(
            **{**cfg.spool.__dict__, "directory": (path.parent / cfg.spool.directory).resolve()}
        )
        cfg = replace(cfg, spool=spool)
    if cfg.audit.file is not None and not cfg.audit.file.is_absolute():
        cfg = replace(cfg, audit=replace(cfg.audit, file=(path.parent / cfg.audit.file).resolve()))
    dimse_tls = cfg.dimse.tls.resolved(path.parent) if cfg.dimse.tls is not None else None
    http_tls = cfg.http.tls.resolved(path.parent) if cfg.http.tls is not None else None
    problems = [*_tls_problems("dimse.tls", dimse_tls), *_tls_problems("http.tls", http_tls)]
    auth = cfg.upstream.auth
    if auth.service_account_file:
        auth = replace(auth, service_account_file=str((path.parent / auth.service_account_file).resolve()))
        cfg = replace(cfg, upstream=replace(cfg.upstream, auth=auth))
        problems += _google_problems(auth.service_account_file)
    audit_dir = cfg.audit.file.parent if cfg.audit.file is not None else None
    if audit_dir is not None and not os.access(audit_dir, os.W_OK | os.X_OK):
        problems.append(f"audit.file: cannot write in {audit_dir} (missing, or not writable by this user)")
    if problems:
        raise ConfigError(problems)
    return replace(cfg, dimse=replace(cfg.dimse, tls=dimse_tls), http=replace(cfg.http, tls=http_tls))


def _google_problems(service_account_file: str) -> list[str]:
    """Why ``upstream.auth.service_account_file`` is not a usable service account key,
    checked at load (no network) so that ``check-config`` says so, not the first
    delivery."""
    from google.oauth2 import service_account  # only configs that name a key need it

    if not os.access(service_account_file, os.R_OK):
        return [f"upstream.auth.service_account_file: cannot read {service_account_file}"]
    try:
        service_account.Credentials.from_service_account_file(service_account_file)
    except (ValueError, KeyError) as exc:
        return [f"upstream.auth.service_account_file: not a service account key ({_first_line(exc)})"]
    return []


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _tls_problems(section: str, tls: TlsConfig | None) -> list[str]:
    """Why ``tls`` cannot make a server context, naming the key at fault; checked at
    load so that a bad file stops ``check-config`` and start-up, not a handshake."""
    if tls is None:
        return []
    files = {"certificate": tls.certificate, "private_key": tls.private_key, "ca_certificates": tls.ca_certificates}
    problems = []
    for key, file in files.items():
        if file is not None and not os.access(file, os.R_OK):
            problems.append(f"{section}.{key}: cannot read {file}")
    if problems:
        return problems
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
    except (OSError, ssl.SSLError) as exc:
        return [f"{section}.certificate, {section}.private_key: not a PEM certificate and its private key ({exc})"]
    if tls.ca_certificates is not None:
        try:
            context.load_verify_locations(cafile=tls.ca_certificates)
        except (OSError, ssl.SSLError) as exc:
            return [f"{section}.ca_certificates: not PEM CA certificates ({exc})"]
    return []
