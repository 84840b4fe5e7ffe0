"""`client_address`: which hop of X-Forwarded-For is the client, given the proxies
trusted. Each proxy appends the address it saw, so the chain is read from the right
and only as far as trusted proxies vouch for it."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, load_config
from gateway.trusted import networks
from gateway.web.forwarded import client_address

TRUSTED = networks(("10.0.0.0/8", "192.0.2.7", "2001:db8::/32"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # not from a proxy: the header is anyone's say
        ("10.1.1.1", [], "10.1.1.1"),  # a proxy's own request
        ("10.1.1.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.1.1.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client's own header left of it
        ("10.1.1.1", ["6.6.6.6", "198.51.100.1, 192.0.2.7"], "198.51.100.1"),  # two proxies, two headers
        ("10.1.1.1", ["198.51.100.1:4321"], "198.51.100.1"),
        ("10.1.1.1", ["[2001:db9::1]:443"], "2001:db9::1"),
        ("10.1.1.1", ["unknown"], "10.1.1.1"),  # not an address: the last hop vouched for
        ("10.1.1.1", ["198.51.100.1, garbage, 10.2.2.2"], "10.2.2.2"),
        ("10.1.1.1", ["10.3.3.3, 10.2.2.2"], "10.3.3.3"),  # all proxies: the farthest
        ("::ffff:10.1.1.1", ["198.51.100.1"], "198.51.100.1"),  # IPv4 on a dual-stack socket
        ("2001:db8::9", ["2001:db9::1"], "2001:db9::1"),
        (None, ["198.51.100.1"], None),
    ],
)
def test_the_client_is_the_first_untrusted_hop_from_the_right(peer: str | None, forwarded_for: list[str], client: str | None) -> None:
    assert client_address(peer, forwarded_for, TRUSTED) == client


def test_trusted_proxies_must_be_addresses_or_networks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "gateway.toml"
    path.write_text('[http]\ntrusted_proxies = ["10.0.0.0/8", "::1", "proxy.example"]\n')
    with pytest.raises(ConfigError, match="'proxy.example' is not an IP address or network"):
        load_config(path)
    path.write_text('[http]\ntrusted_proxies = ["10.0.0.0/8", "::1"]\n')
    assert load_config(path).http.trusted_proxies == ("10.0.0.0/8", "::1")
