"""The facade behind a reverse proxy that ends TLS: a real HAProxy (``option
forwardfor``, ``X-Forwarded-Proto https``) in front of it, clients on their own
loopback addresses (curl ``--interface 127.0.0.2`` and ``127.0.0.3``).

With the proxy's address in ``http.trusted_proxies`` the facade takes the client from
``X-Forwarded-For``: one client guessing passwords is locked out alone (every request
came from the proxy's address before, so the whole site was), the log names that
client, and the URLs handed back say ``https://`` as the browser's page does. The same
headers sent straight to the facade by a client are not believed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom

from tests.support import dcmtk
from tests.support.curl import CurlResult, curl
from tests.support.daemon import Gateway
from tests.support.haproxy import HAProxy, facade_config
from tests.support.pki import Pki
from tests.support.synth import ct_series

A, B = "127.0.0.2", "127.0.0.3"  # two clients of the proxy


def test_the_client_behind_a_trusted_proxy_is_the_one_locked_out_logged_and_answered(
    tmp_path: Path, pki: Pki, gateway: Callable[..., Gateway]
) -> None:
    gw = gateway(
        http={"trusted_proxies": ["127.0.0.1"]},
        http_auth={"basic_users": {"viewer": "right"}, "max_failures_per_minute": 3},
    )
    pem = tmp_path / "proxy.pem"
    pem.write_text((pki.directory / "server.crt").read_text() + (pki.directory / "server.key").read_text())
    proxy = HAProxy(tmp_path / "haproxy", config=lambda port: facade_config(port, gw.http_port, pem)).start()
    try:
        instance = ct_series(tmp_path / "ct", 1, rows=32, columns=32)[0]
        assert dcmtk.storescu(gw.port, [instance], gw.ae_title).returncode == 0
        gw.wait_counts(delivered=1)
        ds = pydicom.dcmread(instance, stop_before_pixels=True)
        series = f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        front = f"https://127.0.0.1:{proxy.port}"

        def through_proxy(client: str, password: str, path: str = "/dicom-web/studies") -> CurlResult:
            return curl("--interface", client, "--cacert", str(pki.directory / "ca.crt"), "-u", f"viewer:{password}", front + path)

        assert [through_proxy(A, "wrong").status for _ in range(4)] == [401, 401, 401, 429]
        assert through_proxy(B, "right").status == 200  # B is not A
        assert through_proxy(A, "right").status == 429  # A waits out its minute
        log = gw.log()
        assert f"from {A}: 401" in log and f"{A}: 3 failed authentications" in log
        assert "from 127.0.0.1: 401" not in log

        metadata = through_proxy(B, "right", series + "/metadata")
        assert metadata.status == 200
        uri = metadata.json()[0]["7FE00010"]["BulkDataURI"]
        assert uri.startswith(f"{front}{series}/instances/{ds.SOPInstanceUID}/bulkdata/"), uri

        # straight to the facade, the same headers say nothing
        spoof = ["--interface", B, "-H", "X-Forwarded-For: 10.9.9.9", "-H", "X-Forwarded-Proto: https"]
        assert curl(*spoof, "-u", "viewer:wrong", f"{gw.web_url}/dicom-web/studies").status == 401
        direct = curl(*spoof, "-u", "viewer:right", f"{gw.web_url}{series}/metadata")
        assert direct.json()[0]["7FE00010"]["BulkDataURI"].startswith(f"{gw.web_url}{series}/")
        log = gw.log()
        assert f"from {B}: 401" in log and "10.9.9.9" not in log
    finally:
        proxy.stop()
