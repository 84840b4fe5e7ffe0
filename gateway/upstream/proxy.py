"""The egress proxy the environment names (``HTTPS_PROXY``, ``HTTP_PROXY``,
``NO_PROXY``, lower-case too), for every HTTP request the gateway makes outward.

Looked up per request host here rather than with aiohttp's ``trust_env``, which also
reads ``~/.netrc`` in a worker thread on every request (a cost per WADO-RS retrieval of
a C-MOVE) and refuses a request that carries its own Authorization when netrc names
the host.
"""

from __future__ import annotations

import functools
import ipaddress
import urllib.request

from yarl import URL


@functools.cache
def _environment() -> dict[str, str]:
    return urllib.request.getproxies_environment()


@functools.lru_cache(maxsize=256)
def _bypassed(host: str) -> bool:
    """NO_PROXY names it, or it is link-local: a cloud metadata service
    (169.254.169.254, Azure's managed identity among them) answers only the machine
    itself, never through a proxy, whatever NO_PROXY forgot."""
    try:
        if ipaddress.ip_address(host.strip("[]")).is_link_local:
            return True
    except ValueError:
        pass
    return bool(urllib.request.proxy_bypass_environment(host, _environment()))  # type: ignore[attr-defined]  # public, not in typeshed


def proxy_for(url: URL) -> str | None:
    """The proxy URL for a request to ``url``; None to go direct."""
    proxy = _environment().get(url.scheme or "")
    if not proxy or url.host is None or _bypassed(url.host):
        return None
    return proxy
