"""A real HAProxy (Debian's /usr/sbin/haproxy) on a free loopback port: in TCP mode in
front of gateway nodes, as the README's two-node deployment runs it, or in HTTP mode in
front of an archive, admitting only requests with a valid JWT access token (what Azure's
DICOM service does with Entra ID's tokens)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.ports import free_port, wait_for_port
from tests.support.process import terminate

HAPROXY = Path("/usr/sbin/haproxy")


def dimse_config(port: int, nodes: Sequence[int], check_interval_ms: int = 500) -> str:
    """The DIMSE front end of the README's example, listening on ``port``: one
    association per connection, spread by connection count, a node that refuses
    connections taken out of rotation and a refused connect sent to the other node."""
    servers = "".join(
        f"    server node{n} 127.0.0.1:{p} check inter {check_interval_ms}ms fall 2 rise 2\n"
        for n, p in enumerate(nodes, 1)
    )
    return (
        "global\n    maxconn 512\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    timeout server 10m\n"
        "    retries 3\n    option redispatch\n"
        f"frontend dimse\n    bind 127.0.0.1:{port}\n    default_backend gateways\n"
        f"backend gateways\n    balance leastconn\n{servers}"
    )


def proxy_protocol_config(port: int, v1_port: int, gateway_port: int, source: str) -> str:
    """The DIMSE front end passing each connection on with a PROXY protocol header
    naming its client: version 2 on ``port`` (with its health checks, which send the
    LOCAL command), version 1 on ``v1_port``; HAProxy connects to the gateway from
    ``source``, so the gateway tells it from its clients on one loopback."""
    return (
        "global\n    maxconn 256\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    timeout server 10m\n"
        f"frontend v2\n    bind 127.0.0.1:{port}\n    default_backend v2\n"
        f"frontend v1\n    bind 127.0.0.1:{v1_port}\n    default_backend v1\n"
        f"backend v2\n    server gw 127.0.0.1:{gateway_port} send-proxy-v2 source {source} check inter 300ms\n"
        f"backend v1\n    server gw 127.0.0.1:{gateway_port} send-proxy source {source}\n"
    )


def jwt_config(port: int, archive_port: int, secret: str, audience: str) -> str:
    """An HTTP front end passing to the archive on ``archive_port`` only requests whose
    ``Authorization: Bearer`` JWT is signed with ``secret`` (HS256), names ``audience``
    and has not expired; others get 401 with RFC 6750's ``WWW-Authenticate``. Each
    request is logged as ``status method path`` on haproxy's standard output."""
    refuse = 'http-request return status 401 hdr WWW-Authenticate "Bearer error=\\"invalid_token\\""'
    return (
        "global\n    maxconn 256\n    log stdout format raw local0\n"
        "defaults\n    mode http\n    log global\n    timeout connect 2s\n    timeout client 60s\n"
        "    timeout server 60s\n"
        '    log-format "%ST %HM %HP"\n'
        f"frontend archive\n    bind 127.0.0.1:{port}\n"
        "    http-request set-var(txn.bearer) http_auth_bearer\n"
        "    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')\n"
        "    http-request set-var(txn.aud) var(txn.bearer),jwt_payload_query('$.aud')\n"
        "    http-request set-var(txn.now) date\n"
        f'    {refuse} unless {{ var(txn.bearer),jwt_verify("HS256","{secret}") -m int 1 }}\n'
        f"    {refuse} unless {{ var(txn.aud) -m str {audience} }}\n"
        f"    {refuse} if {{ var(txn.exp),sub(txn.now) -m int lt 1 }}\n"
        "    default_backend archive\n"
        f"backend archive\n    server archive 127.0.0.1:{archive_port}\n"
    )


def tls_config(port: int, archive_port: int, pem: Path) -> str:
    """An HTTPS front end (``pem``: certificate and key) passing to the plain HTTP
    archive on ``archive_port``: an archive reached over TLS, as the cloud ones are."""
    return (
        "global\n    maxconn 256\n"
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n"
        f"frontend archive\n    bind 127.0.0.1:{port} ssl crt {pem}\n    default_backend archive\n"
        f"backend archive\n    server archive 127.0.0.1:{archive_port}\n"
    )


def facade_config(port: int, gateway_port: int, pem: Path) -> str:
    """A reverse proxy in front of the gateway's facade, as a site puts one: HTTPS
    ended here (``pem``), the client's address appended to ``X-Forwarded-For``
    (``option forwardfor``), the scheme it used said in ``X-Forwarded-Proto``."""
    return (
        "global\n    maxconn 256\n"
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 60s\n    timeout server 60s\n"
        f"frontend facade\n    bind 127.0.0.1:{port} ssl crt {pem}\n    option forwardfor\n"
        "    http-request set-header X-Forwarded-Proto https\n    default_backend gateway\n"
        f"backend gateway\n    server gw 127.0.0.1:{gateway_port}\n"
    )


class HAProxy:
    """One haproxy process in the foreground; ``stop()`` ends it. ``config`` makes its
    configuration for the port it listens on (default: `dimse_config` over ``nodes``)."""

    def __init__(
        self, workdir: Path, nodes: Sequence[int] = (), config: Callable[[int], str] | None = None
    ) -> None:
        if shutil.which(str(HAPROXY)) is None:
            raise AssertionError(f"{HAPROXY} missing: run scripts/install-test-deps.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.config_path.write_text(config(self.port) if config else dimse_config(self.port, nodes))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port("127.0.0.1", self.port, 10)
        except AssertionError:
            self.stop()
            raise AssertionError(f"haproxy did not start:\n{self.log_path.read_text()}") from None
        return self

    def stop(self) -> None:
        terminate(self.proc, 5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
