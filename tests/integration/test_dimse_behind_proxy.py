"""DIMSE behind HAProxy in TCP mode with the PROXY protocol (``send-proxy-v2`` and
``send-proxy``), as the README's two-node set-up runs it. HAProxy connects to the
gateway from 127.0.0.9, listed in ``dimse.trusted_proxies``; the modality (dcmtk's
storescu) is on 127.0.0.1.

The gateway checks each peer's ``host`` against the client the header names, and logs
that client; HAProxy's health checks (the LOCAL command) stay quiet. Before, every
association came from the proxy's address, so host checks could only be HAProxy's.
From an address not listed, a PROXY line is no more than bytes that are not a PDU; a
listed address that sends none is refused.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.test_tls import _client, _dimse_tls
from tests.reliability.test_fault_fuzz import associate_rq
from tests.support import dcmtk
from tests.support.daemon import Gateway
from tests.support.haproxy import HAProxy, proxy_protocol_config
from tests.support.pki import Pki
from tests.support.ports import free_port
from tests.support.synth import ct_series

PROXY = "127.0.0.9"
PEERS = (
    '\n[[dimse.peers]]\nae_title = "MOD"\nhost = "127.0.0.1"\nport = 104\n'
    '\n[[dimse.peers]]\nae_title = "FAR"\nhost = "127.0.0.5"\nport = 104\n'
)


@pytest.fixture
def behind(tmp_path: Path, gateway: Callable[..., Gateway]):  # type: ignore[no-untyped-def]
    gw = gateway(dimse={"require_known_peers": True, "trusted_proxies": [PROXY]}, extra=PEERS)
    v1_port = free_port()
    proxy = HAProxy(tmp_path / "haproxy", config=lambda port: proxy_protocol_config(port, v1_port, gw.port, PROXY)).start()
    try:
        yield gw, proxy, v1_port
    finally:
        proxy.stop()


def test_host_checks_and_logs_see_the_client_the_proxy_names(tmp_path: Path, behind) -> None:  # type: ignore[no-untyped-def]
    gw, proxy, v1_port = behind
    files = ct_series(tmp_path / "ct", 2, rows=32, columns=32)
    for port in (proxy.port, v1_port):
        result = dcmtk.storescu(port, files, gw.ae_title, calling_ae="MOD")
        assert result.returncode == 0, result.stdout + result.stderr
    refused = dcmtk.storescu(proxy.port, files, gw.ae_title, calling_ae="FAR")
    assert refused.returncode != 0
    gw.wait_counts(delivered=4)  # two instances, each sent once through either front end
    time.sleep(1)  # a few of HAProxy's health checks
    log = gw.log()
    assert log.count("association accepted from MOD@127.0.0.1:") == 2
    assert "association from FAR@127.0.0.1:" in log
    assert PROXY not in log, [line for line in log.splitlines() if PROXY in line]
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "association from FAR@127.0.0.1:" in warnings[0], warnings  # health checks: quiet


def answer(sock: socket.socket) -> bytes:
    """What the gateway answered before it closed (nothing when it reset)."""
    try:
        return sock.recv(64)
    except ConnectionResetError:
        return b""


def test_proxy_headers_are_taken_only_from_trusted_proxies(behind) -> None:  # type: ignore[no-untyped-def]
    gw, _, _ = behind
    # a client on 127.0.0.1 claiming to be 127.0.0.5 is not believed: the line is no PDU
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.5 127.0.0.1 4000 104\r\n" + associate_rq(calling=b"FAR", called=gw.ae_title.encode()))
        assert answer(sock)[:1] != b"\x02"  # no A-ASSOCIATE-AC
    # the trusted address sending a PDU with no header first is refused
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10, source_address=(PROXY, 0)) as sock:
        sock.sendall(associate_rq(calling=b"MOD", called=gw.ae_title.encode()))
        assert answer(sock)[:1] != b"\x02"
    log = gw.log()
    assert "FAR@127.0.0.5" not in log
    assert f"connection from {PROXY}:" in log and "does not begin with a PROXY protocol header" in log


def test_the_tls_port_takes_the_header_before_the_handshake(tmp_path: Path, tls_gateway, pki: Pki) -> None:  # type: ignore[no-untyped-def]
    """HAProxy passing TLS through untouched, its header first: the handshake still
    gets every byte of its own, and the client is the modality."""
    tls_port = free_port()
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port) + PEERS, dimse={"require_known_peers": True, "trusted_proxies": [PROXY]})
    v1_port = free_port()
    proxy = HAProxy(tmp_path / "haproxy", config=lambda port: proxy_protocol_config(port, v1_port, tls_port, PROXY)).start()
    try:
        files = ct_series(tmp_path / "ct", 2, rows=32, columns=32)
        for port in (proxy.port, v1_port):
            result = dcmtk.storescu(port, files, gw.ae_title, calling_ae="MOD", extra_args=_client(pki, "client"))
            assert result.returncode == 0, result.stdout + result.stderr
        gw.wait_counts(delivered=4)
        time.sleep(1)  # health checks on the TLS port
        log = gw.log()
        assert log.count("association accepted from MOD@127.0.0.1:") == 2
        assert PROXY not in log and " WARNING " not in log, log
    finally:
        proxy.stop()
