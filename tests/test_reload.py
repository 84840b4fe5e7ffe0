"""What a SIGHUP applies and what it leaves for a restart (`gateway.reload`)."""

from __future__ import annotations

from gateway.config import parse_config
from gateway.reload import changed, merge


def test_merge_takes_reloadable_keys_and_names_the_rest() -> None:
    running = parse_config({"dimse": {"port": 11112, "max_associations": 8}, "spool": {"min_free_mb": 512}})
    loaded = parse_config({
        "dimse": {
            "port": 104, "max_associations": 2, "require_known_peers": True,
            "peers": [{"ae_title": "CT1", "host": "127.0.0.1", "port": 104}],
        },
        "spool": {"min_free_mb": 100, "max_size_mb": 2048, "concurrency": 8},
        "logging": {"level": "DEBUG"},
    })
    merged, needs_restart = merge(running, loaded)
    assert merged.dimse.max_associations == 2 and merged.dimse.require_known_peers
    assert [p.ae_title for p in merged.dimse.peers] == ["CT1"]
    assert (merged.spool.min_free_mb, merged.spool.max_size_mb) == (100, 2048)
    assert merged.logging.level == "DEBUG"
    assert merged.dimse.port == 11112 and merged.spool.concurrency == running.spool.concurrency
    assert needs_restart == ["dimse.port", "spool.concurrency"]
    assert changed(running, merged) == [
        "dimse.max_associations", "dimse.peers", "dimse.require_known_peers", "logging.level",
        "spool.max_size_mb", "spool.min_free_mb",
    ]
    assert merge(running, running) == (running, [])
