"""A hospital's egress proxy: every request the gateway makes to the archive and to its
identity provider goes through the proxy named in the standard environment variables
(here a real tinyproxy in front of a real Orthanc), and what NO_PROXY names goes direct."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import dcmtk
from tests.support.daemon import Gateway
from tests.support.haproxy import HAProxy, tls_config
from tests.support.orthanc import Orthanc
from tests.support.pki import Pki
from tests.support.synth import ct_series
from tests.support.tinyproxy import Tinyproxy
from tests.support.tokenserver import TokenServer


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Tinyproxy]:
    server = Tinyproxy(tmp_path / "proxy").start()
    yield server
    server.stop()


def test_archive_and_token_requests_go_through_the_proxy(
    tmp_path: Path, orthanc: Orthanc, proxy: Tinyproxy, gateway: Callable[..., Gateway]
) -> None:
    idp = TokenServer("dicom-gateway", "s3cret").start()
    try:
        upstream = (
            f'type = "dicomweb"\nurl = "{orthanc.dicomweb_url}"\ntimeout = 30\n'
            f'[upstream.auth]\ntype = "oauth2"\ntoken_url = "{idp.token_url}"\nclient_id = "dicom-gateway"\n'
            'client_secret = "s3cret"\n'
        )
        gw = gateway(upstream=upstream, env={"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": ""})
        assert dcmtk.storescu(gw.port, ct_series(tmp_path / "ct", 3, rows=32, columns=32), gw.ae_title).returncode == 0
        gw.wait_counts(delivered=3)
        through = proxy.requests()
        assert ("POST", idp.token_url) in through
        assert any(m == "POST" and u.startswith(f"{orthanc.dicomweb_url}/studies/") for m, u in through), through
        assert len(orthanc.sop_instance_uids()) == 3
    finally:
        idp.stop()


def test_no_proxy_keeps_the_archive_direct(
    tmp_path: Path, orthanc: Orthanc, proxy: Tinyproxy, gateway: Callable[..., Gateway]
) -> None:
    gw = gateway(upstream_url=orthanc.dicomweb_url, env={"HTTP_PROXY": proxy.url, "NO_PROXY": "127.0.0.1,localhost"})
    assert dcmtk.storescu(gw.port, ct_series(tmp_path / "ct", 2, rows=32, columns=32), gw.ae_title).returncode == 0
    gw.wait_counts(delivered=2)
    assert proxy.requests() == []


def test_an_https_archive_is_reached_through_the_proxys_tunnel(
    tmp_path: Path, orthanc: Orthanc, proxy: Tinyproxy, pki: Pki, gateway: Callable[..., Gateway]
) -> None:
    """The cloud archives speak HTTPS: through the proxy that is a CONNECT tunnel, and
    the archive's certificate is still verified end to end (its CA given to the daemon
    the standard way, SSL_CERT_FILE)."""
    pem = tmp_path / "server.pem"
    pem.write_text((pki.directory / "server.crt").read_text() + (pki.directory / "server.key").read_text())
    front = HAProxy(tmp_path / "tls", config=lambda port: tls_config(port, orthanc.http_port, pem)).start()
    try:
        url = f"https://127.0.0.1:{front.port}/dicom-web"
        env = {"HTTPS_PROXY": proxy.url, "NO_PROXY": "", "SSL_CERT_FILE": str(pki.directory / "ca.crt")}
        gw = gateway(upstream_url=url, env=env)
        assert dcmtk.storescu(gw.port, ct_series(tmp_path / "ct", 2, rows=32, columns=32), gw.ae_title).returncode == 0
        gw.wait_counts(delivered=2)
        assert ("CONNECT", f"127.0.0.1:{front.port}") in proxy.requests()
        assert len(orthanc.sop_instance_uids()) == 2
    finally:
        front.stop()
