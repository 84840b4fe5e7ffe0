"""``host = "::"``: every address, IPv4 and IPv6, on the DIMSE and the HTTP ports.

asyncio binds IPv6 sockets with IPV6_V6ONLY, so a gateway configured on "::" refused
every IPv4 modality (connection refused: dcmtk's tools speak IPv4 only) while its log
said it listened "on :::11112". Now the port takes both, and a modality or a viewer on
IPv4 is named, checked against `dimse.peers` and audited by its IPv4 address, not as
``::ffff:127.0.0.1``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support import dcmtk
from tests.support.curl import curl
from tests.support.daemon import Gateway
from tests.support.ports import wait_until
from tests.support.pyscu import echo


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def echo_over_ipv6(port: int, calling_ae: str) -> bool:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("::1", port, ae_title="DICOMGW")
    if not assoc.is_established:
        return False
    status = echo(assoc)
    assoc.release()
    return status == 0


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
def test_a_gateway_on_every_address_takes_ipv4_and_ipv6(tmp_path: Path) -> None:
    gw = Gateway(
        tmp_path / "gw",
        dimse={
            "require_known_peers": True,
            "peers": [
                {"ae_title": "ECHOSCU", "host": "127.0.0.1", "port": 104},
                {"ae_title": "V6SCU", "host": "::1", "port": 104},
            ],
        },
        http_auth={"basic_users": {"viewer": "secret"}},
    )
    config = gw.config_path.read_text()
    dimse_host, http_host = f'host = "127.0.0.1"\nport = {gw.port}', f'host = "127.0.0.1"\nport = {gw.http_port}'
    assert dimse_host in config and http_host in config
    gw.config_path.write_text(
        config.replace(dimse_host, f'host = "::"\nport = {gw.port}').replace(http_host, f'host = "::"\nport = {gw.http_port}')
    )
    gw.start()
    try:
        assert dcmtk.echoscu(gw.port, gw.ae_title).returncode == 0  # IPv4, a known peer from its own host
        assert echo_over_ipv6(gw.port, "V6SCU")
        assert not echo_over_ipv6(gw.port, "ECHOSCU")  # a known AE title from another host
        assert curl(f"http://127.0.0.1:{gw.http_port}/healthz").status == 200
        assert curl("-g", f"http://[::1]:{gw.http_port}/healthz").status == 200
        assert curl("-u", "viewer:secret", f"http://127.0.0.1:{gw.http_port}/dicom-web/studies").status == 200
        assert curl("-u", "viewer:wrong", f"http://127.0.0.1:{gw.http_port}/dicom-web/studies").status == 401
        assert curl("-g", "-u", "viewer:wrong", f"http://[::1]:{gw.http_port}/dicom-web/studies").status == 401
        wait_until(lambda: "rejected" in gw.log(), 10, 0.1, "the rejection not logged")
        log = gw.log()
        assert f"on [::]:{gw.port}" in log and f"HTTP on [::]:{gw.http_port}" in log, log
        assert "association accepted from ECHOSCU@127.0.0.1:" in log, log
        assert "association accepted from V6SCU@[::1]:" in log, log
        assert "/dicom-web/studies from 127.0.0.1: 401" in log and "/dicom-web/studies from ::1: 401" in log, log
        assert "::ffff:" not in log, log
    finally:
        gw.kill()


@pytest.mark.parametrize("taken", ["DIMSE", "HTTP", "host"])
def test_a_listener_that_cannot_open_is_named_with_the_reason(tmp_path: Path, taken: str) -> None:
    """The daemon refuses to start, saying which listener failed and why, where asyncio
    named only an address tuple ("error while attempting to bind on address
    ('127.0.0.1', 11112): address already in use"), leaving the admin to work out which
    of the gateway's ports it was: another PACS on the DIMSE port, another service on
    the HTTP port, a host address not of this machine."""
    gw = Gateway(tmp_path / "gw")
    holder = socket.socket()
    try:
        if taken == "host":
            config = gw.config_path.read_text()
            gw.config_path.write_text(config.replace(f'host = "127.0.0.1"\nport = {gw.port}', f'host = "192.0.2.1"\nport = {gw.port}', 1))
            expected = f"cannot start: DIMSE port 192.0.2.1:{gw.port}: Cannot assign requested address"
        else:
            port = gw.port if taken == "DIMSE" else gw.http_port
            holder.bind(("127.0.0.1", port))
            holder.listen()
            expected = f"cannot start: {taken} port 127.0.0.1:{port}: Address already in use"
        run = gw.cli("run")
        assert run.returncode == 1, run.stderr
        assert expected in run.stderr and "Traceback" not in run.stderr, run.stderr[-2000:]
    finally:
        holder.close()
