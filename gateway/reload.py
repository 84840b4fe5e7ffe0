"""What a SIGHUP may change in a running daemon, and what needs a restart.

Reloaded: who may associate and do what (``dimse.peers``, ``require_known_peers``,
``check_called_ae``, ``[dimse.user_identity]``: its users and passcodes),
where copies go (``dimse.routes``: for what is received from then on), the
association limits and timeouts (``max_associations``, ``ack_timeout``,
``network_timeout``, ``acse_timeout``, ``dimse_timeout``, ``shutdown_grace``), the load
balancers whose PROXY protocol headers are taken (``trusted_proxies``), the disk
limits (``spool.min_free_mb``, ``spool.max_size_mb``), ``logging.level`` and where audit
messages go (``[audit]``: the replaced trail sends what it holds first). Running
associations keep the timeouts they started with and are never dropped. Everything
else (addresses, ports, AE title, spool directory, upstream, ...) is bound to sockets,
files or sessions opened at start: a change there is reported and waits for a restart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.config import Config

RELOADABLE = {
    "dimse": (
        "peers", "routes", "require_known_peers", "check_called_ae", "user_identity", "max_associations", "ack_timeout",
        "network_timeout", "acse_timeout", "dimse_timeout", "shutdown_grace", "trusted_proxies",
    ),
    "spool": ("min_free_mb", "max_size_mb"),
    "logging": ("level",),
    "audit": ("syslog", "file", "source_id", "enterprise_site_id"),
}


def _flat(config: Config) -> dict[str, Any]:
    """``section.key`` -> value for every key of the config."""
    flat: dict[str, Any] = {}
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        for key in dataclasses.fields(value):
            flat[f"{section.name}.{key.name}"] = getattr(value, key.name)
    return flat


def merge(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """The config to run with after a reload: ``running`` with the reloadable keys of
    ``loaded``; and the keys ``loaded`` changes that only a restart applies."""
    sections = {
        name: dataclasses.replace(getattr(running, name), **{key: getattr(getattr(loaded, name), key) for key in keys})
        for name, keys in RELOADABLE.items()
    }
    merged = dataclasses.replace(running, **sections)
    now, wanted = _flat(merged), _flat(loaded)
    return merged, sorted(key for key in wanted if wanted[key] != now[key])


def changed(before: Config, after: Config) -> list[str]:
    """The keys whose values differ."""
    a, b = _flat(before), _flat(after)
    return sorted(key for key in a if a[key] != b[key])
