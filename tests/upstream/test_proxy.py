"""Which requests go through the environment's egress proxy (gateway.upstream.proxy)."""

from __future__ import annotations

import pytest
from yarl import URL

from gateway.upstream import proxy


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.hospital.example:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.hospital.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.hospital.example")
    proxy._environment.cache_clear()
    proxy._bypassed.cache_clear()
    yield
    proxy._environment.cache_clear()
    proxy._bypassed.cache_clear()


@pytest.mark.usefixtures("environment")
def test_outward_requests_go_through_the_proxy_and_local_ones_direct() -> None:
    assert proxy.proxy_for(URL("https://myws-dicom.dicom.azurehealthcareapis.com/v2/studies")) == "http://proxy.hospital.example:3128"
    assert proxy.proxy_for(URL("https://login.microsoftonline.com/t/oauth2/v2.0/token")) == "http://proxy.hospital.example:3128"
    assert proxy.proxy_for(URL("http://pacs.hospital.example:8042/dicom-web")) is None  # NO_PROXY
    assert proxy.proxy_for(URL("http://localhost:8042/dicom-web")) is None
    # a metadata service is link-local: never through a proxy, even when NO_PROXY forgot it
    assert proxy.proxy_for(URL("http://169.254.169.254/metadata/identity/oauth2/token?api-version=2018-02-01")) is None
