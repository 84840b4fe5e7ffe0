"""DIMSE over TLS and the HTTP side over HTTPS, with dcmtk's and curl's real TLS clients
against certificates made with openssl (`tests.support.pki`): a CA, a server certificate for
127.0.0.1/localhost and a client certificate it signed, and a client certificate of
another CA that the gateway must refuse."""

from __future__ import annotations

import json
import socket
import struct
import ssl
import subprocess
import sys
import time
from pathlib import Path

from pydicom import Dataset, dcmread
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    SecondaryCaptureImageStorage,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from tests.support import dcmtk
from tests.support.corpus import sample_files
from tests.integration.test_connection_caps import _closed, _fill_then_flood
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.pki import Pki
from tests.support.ports import free_port, wait_until

def _dimse_tls(port: int, ca: bool = True) -> str:
    return (
        f'\n[dimse.tls]\nport = {port}\ncertificate = "server.crt"\nprivate_key = "server.key"\n'
        + ('ca_certificates = "ca.crt"\n' if ca else "")
    )


def _client(pki: Pki, name: str | None) -> list[str]:
    """dcmtk's TLS options: our key and certificate (none: anonymous TLS), the server
    verified against our CA."""
    auth = ["+tls", str(pki.directory / f"{name}.key"), str(pki.directory / f"{name}.crt"), "-pw"] if name else ["+tla"]
    return [*auth, "+cf", str(pki.directory / "ca.crt"), "-rc"]


def test_echo_store_and_find_over_tls_with_a_client_certificate(tls_gateway, pki: Pki) -> None:
    tls_port = free_port()
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port))
    echo = dcmtk.echoscu(tls_port, gw.ae_title, extra_args=_client(pki, "client"))
    assert echo.returncode == 0, echo.stdout + echo.stderr
    files = sample_files()
    store = dcmtk.storescu(tls_port, files, gw.ae_title, extra_args=_client(pki, "client"))
    assert store.returncode == 0, store.stdout + store.stderr
    assert gw.wait_counts(delivered=len(files))["delivered"] == len(files)
    find = dcmtk.findscu(
        tls_port, gw.ae_title, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": ""},
        extra_args=[*_client(pki, "client"), "-v"],
    )
    assert find.returncode == 0 and "Find Response: 1 (Pending)" in find.stdout + find.stderr, find.stderr
    # The plain port still serves beside the TLS one.
    assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0
    # A plain DIMSE client on the TLS port gets nowhere, and the log says why.
    assert dcmtk.echoscu(tls_port, gw.ae_title, timeout=20).returncode != 0
    wait_until(lambda: "TLS connection from 127.0.0.1" in gw.log(), 10, 0.1, "plain client on the TLS port not logged")


def test_client_without_a_certificate_or_from_another_ca_is_refused_and_logged(tls_gateway, pki: Pki) -> None:
    tls_port = free_port()
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port), http_auth={"basic_users": {"admin": "secret"}})
    anonymous = dcmtk.echoscu(tls_port, gw.ae_title, extra_args=_client(pki, None), timeout=20)
    assert anonymous.returncode != 0
    stranger = dcmtk.storescu(tls_port, sample_files()[:1], gw.ae_title, extra_args=_client(pki, "stranger"), timeout=20)
    assert stranger.returncode != 0
    wait_until(lambda: gw.log().count("TLS connection from 127.0.0.1") >= 2, 10, 0.1, "refusals not logged")
    log = gw.log()
    assert "refused: no client certificate" in log
    assert "refused: client certificate not trusted (unable to get local issuer certificate)" in log
    assert sum(gw.counts().values()) == 0
    metrics = curl("-u", "admin:secret", f"{gw.web_url}/metrics").body.decode()
    for reason in ("tls_no_client_certificate", "tls_certificate_refused"):
        assert f'gateway_dimse_associations_rejected_total{{reason="{reason}"}} 1.0' in metrics
    # The right certificate still gets through.
    assert dcmtk.echoscu(tls_port, gw.ae_title, extra_args=_client(pki, "client")).returncode == 0


def test_get_and_move_over_tls(tls_gateway, pki: Pki, storescp) -> None:
    """pynetdicom (dcmtk's getscu and movescu have no TLS) retrieves over TLS: C-GET
    brings the instances back over the TLS association, C-MOVE sends them to a peer."""
    scp = storescp()
    tls_port = free_port()
    peer = f'\n[[dimse.peers]]\nae_title = "STORESCP"\nhost = "127.0.0.1"\nport = {scp.port}\n'
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port) + peer)
    files = sample_files()
    assert dcmtk.storescu(tls_port, files, gw.ae_title, extra_args=_client(pki, "client")).returncode == 0
    gw.wait_counts(delivered=len(files))
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.directory / "ca.crt"))
    context.load_cert_chain(pki.directory / "client.crt", pki.directory / "client.key")
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    ae = AE(ae_title="TLSGET")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.add_requested_context(SecondaryCaptureImageStorage)
    assoc = ae.associate(
        "127.0.0.1", tls_port, ae_title=gw.ae_title, tls_args=(context, "localhost"),
        ext_neg=[build_role(SecondaryCaptureImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    try:
        gets = [status.Status for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)]
        moves = [status.Status for status, _ in assoc.send_c_move(query, "STORESCP", StudyRootQueryRetrieveInformationModelMove)]
    finally:
        assoc.release()
    assert gets[-1] == 0x0000 and moves[-1] == 0x0000, (gets, moves)
    expected = sorted(str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files)
    assert sorted(received) == expected
    assert len(scp.wait_for_files(len(files))) == len(files)


def test_a_connection_silent_on_the_tls_port_is_closed_after_acse_timeout(tls_gateway) -> None:
    tls_port = free_port()
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port), dimse={"acse_timeout": 1})
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as silent:
        started = time.monotonic()
        assert silent.recv(1) == b""  # closed by the gateway
        assert time.monotonic() - started < 5
    wait_until(lambda: "refused: no TLS handshake within dimse.acse_timeout" in gw.log(), 10, 0.1, "not logged")


def test_port_checks_on_the_tls_port_are_not_refusals(tls_gateway, pki: Pki) -> None:
    """A load balancer's TCP check connects and closes (or resets) without a byte:
    on the TLS port as on the plain one, no WARNING, no audit of a refused node, no
    rejection counted; a client that sends something other than TLS still is one,
    and TLS clients are served as before."""
    tls_port = free_port()
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port), http_auth={"basic_users": {"admin": "secret"}})
    for reset in (False, True) * 5:
        check = socket.create_connection(("127.0.0.1", tls_port), timeout=10)
        if reset:  # HAProxy's tcp-check closes so
            check.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        check.close()
    assert dcmtk.echoscu(tls_port, gw.ae_title, extra_args=_client(pki, "client")).returncode == 0
    assert "TLS connection from" not in gw.log()
    with socket.create_connection(("127.0.0.1", tls_port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert plain.recv(100) == b""
    wait_until(lambda: "TLS connection from 127.0.0.1" in gw.log(), 10, 0.1, "not logged")
    assert gw.log().count("TLS connection from 127.0.0.1") == 1
    assert "refused: TLS handshake failed (HTTP_REQUEST)" in gw.log()
    metrics = curl("-u", "admin:secret", f"{gw.web_url}/metrics").body.decode()
    assert 'gateway_dimse_associations_rejected_total{reason="tls_handshake_failed"} 1.0' in metrics


def test_without_ca_certificates_no_client_certificate_is_asked(tls_gateway, pki: Pki) -> None:
    tls_port = free_port()
    gw = tls_gateway(dimse_tls=_dimse_tls(tls_port, ca=False))
    echo = dcmtk.echoscu(tls_port, gw.ae_title, extra_args=_client(pki, None))
    assert echo.returncode == 0, echo.stdout + echo.stderr


def test_a_missing_certificate_file_is_named_at_start(tmp_path: Path) -> None:
    gw = Gateway(tmp_path / "gw", extra=_dimse_tls(free_port()))
    result = gw.cli("check-config")
    assert result.returncode != 0
    assert f"dimse.tls.certificate: cannot read {tmp_path / 'gw' / 'server.crt'}" in result.stdout + result.stderr


def test_http_side_over_https(tls_gateway, pki: Pki) -> None:
    """``[http.tls]``: /healthz and the facade answer over HTTPS, verified against the
    CA by curl; plain HTTP on that port gets no answer."""
    http_tls = '\n[http.tls]\ncertificate = "server.crt"\nprivate_key = "server.key"\n'
    gw = tls_gateway(http_tls=http_tls)
    https = f"https://127.0.0.1:{gw.http_port}"
    ca = ("--cacert", str(pki.directory / "ca.crt"))
    health = curl(*ca, f"{https}/healthz")
    assert health.status == 200 and health.json()["status"] == "ok", health.body
    assert dcmtk.storescu(gw.port, sample_files()[:1], gw.ae_title).returncode == 0
    url = f"{https}/dicom-web/studies"
    studies = wait_until(lambda: (r := curl(*ca, url)).status == 200 and r.body and r.json(), 30, 0.2, "study never listed")
    assert len(studies) == 1
    plain = subprocess.run(
        ["/usr/bin/curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{gw.http_port}/healthz"],
        capture_output=True, timeout=30, check=False,
    )
    assert plain.returncode != 0
    # Without the CA, curl refuses the server: it is TLS it cannot verify, not plain HTTP.
    unverified = subprocess.run(["/usr/bin/curl", "-sS", "-o", "/dev/null", f"{https}/healthz"], capture_output=True, timeout=30, check=False)
    assert unverified.returncode == 60, unverified.stderr
    # `spool status` still reaches its daemon's /healthz for what holds delivery.
    status = gw.cli("spool", "status", "--json")
    assert json.loads(status.stdout)["problems"] == [], status.stdout + status.stderr


def test_peers_marked_tls_are_called_over_tls_for_moves_routes_and_echo(tls_gateway, pki: Pki, tmp_path: Path) -> None:
    """A TLS storescp (dcmtk, requiring a client certificate of our CA) as the peer the
    gateway calls: a C-MOVE's sub-operations, a route's copies and `peers --echo` all
    reach it over TLS with the gateway's certificate; a plain storescp marked TLS, and a
    TLS one whose certificate another CA signed, are refused with the reason."""

    def tls_scp(name: str, cert: str) -> dcmtk.StoreSCP:
        key_cert = [str(pki.directory / f"{cert}.key"), str(pki.directory / f"{cert}.crt")]
        return dcmtk.StoreSCP(tmp_path / name, ae_title=name, extra_args=[
            "+tls", *key_cert, "-pw", "+cf", str(pki.directory / "ca.crt"), "-rc",
        ])

    def peer(ae: str, port: int) -> str:
        return f'\n[[dimse.peers]]\nae_title = "{ae}"\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'

    with tls_scp("SECURE", "server") as secure, tls_scp("IMPOSTOR", "stranger") as impostor, \
            dcmtk.StoreSCP(tmp_path / "plain", ae_title="PLAIN") as plain:
        gw = tls_gateway(
            dimse_tls=_dimse_tls(free_port()) + peer("SECURE", secure.port) + peer("IMPOSTOR", impostor.port)
            + peer("PLAIN", plain.port) + '\n[[dimse.routes]]\ndestination = "SECURE"\ncalling_ae = ["CT01"]\n'
        )
        files = sample_files()[:2]
        assert dcmtk.storescu(gw.port, files, gw.ae_title, calling_ae="CT01").returncode == 0
        assert len(secure.wait_for_files(2)) == 2  # the route's copies
        gw.wait_counts(delivered=2)
        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        moved = dcmtk.movescu(gw.port, gw.ae_title, "SECURE", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study})
        assert moved.returncode == 0, moved.stdout + moved.stderr
        # Same instances, same file names: the move shows in the destination's log.
        assert secure.log().count("Received Store Request") == 4

        echoed = gw.cli("peers", "--echo", "--json", "--timeout", "10")
        rows = {r["ae_title"]: r for r in json.loads(echoed.stdout)}
        assert rows["SECURE"]["tls"] and rows["SECURE"]["echo"]["ok"], rows["SECURE"]
        assert rows["IMPOSTOR"]["echo"]["detail"].startswith(f"TLS to 127.0.0.1:{impostor.port} refused: "), rows["IMPOSTOR"]
        assert rows["PLAIN"]["echo"]["ok"] is False and rows["PLAIN"]["echo"]["detail"].startswith("TLS to 127.0.0.1"), rows["PLAIN"]


def test_a_tls_peer_needs_the_dimse_tls_table(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[dimse.peers]]\nae_title = "SECURE"\nhost = "127.0.0.1"\nport = 2762\ntls = true\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "dimse.peers[0].tls: needs [dimse.tls]" in result.stdout + result.stderr


def test_https_connections_in_their_handshake_count_against_the_cap(tls_gateway) -> None:  # type: ignore[no-untyped-def]
    """Connections that never send a ClientHello hold a place like any other: past
    ``http.max_connections`` a new one is closed at once, and the handshake is bounded
    by ``http.idle_timeout``. Before, asyncio ran the handshake before any protocol saw
    the connection: 200 of them were all kept, uncounted, for its 60 s timeout."""
    http_tls = '\n[http.tls]\ncertificate = "server.crt"\nprivate_key = "server.key"\n'
    gw = tls_gateway(http_tls=http_tls, http={"max_connections": 4, "idle_timeout": 3})
    held = _fill_then_flood(gw, gw.http_port)
    for sock in held:  # the handshake timeout ends them
        assert _closed(sock, 10), "a connection stayed in its handshake past http.idle_timeout"
        sock.close()
    assert "http.max_connections (4) open already" in gw.log()
    assert "Traceback" not in gw.log()
