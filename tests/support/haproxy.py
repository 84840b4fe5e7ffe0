"""A real HAProxy (Debian's /usr/sbin/haproxy) in TCP mode in front of gateway nodes,
as the README's two-node deployment runs it, on a free loopback port."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.ports import free_port, wait_for_port
from tests.support.process import terminate

HAPROXY = Path("/usr/sbin/haproxy")


def dimse_config(port: int, nodes: Sequence[int], check_interval_ms: int = 500) -> str:
    """The DIMSE front end of the README's example, listening on ``port``: one
    association per connection, spread by connection count, a node that refuses
    connections taken out of rotation and a refused connect sent to the other node."""
    servers = "".join(
        f"    server node{n} 127.0.0.1:{p} check inter {check_interval_ms}ms fall 2 rise 2\n"
        for n, p in enumerate(nodes, 1)
    )
    return (
        "global\n    maxconn 512\n"
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    timeout server 10m\n"
        "    retries 3\n    option redispatch\n"
        f"frontend dimse\n    bind 127.0.0.1:{port}\n    default_backend gateways\n"
        f"backend gateways\n    balance leastconn\n{servers}"
    )


class HAProxy:
    """One haproxy process in the foreground; ``stop()`` ends it."""

    def __init__(self, workdir: Path, nodes: Sequence[int]) -> None:
        if shutil.which(str(HAPROXY)) is None:
            raise AssertionError(f"{HAPROXY} missing: run scripts/install-test-deps.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_path = workdir / "haproxy.cfg"
        self.log_path = workdir / "haproxy.log"
        self.config_path.write_text(dimse_config(self.port, nodes))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> HAProxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(HAPROXY), "-db", "-f", str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_for_port("127.0.0.1", self.port, 10)
        except AssertionError:
            self.stop()
            raise AssertionError(f"haproxy did not start:\n{self.log_path.read_text()}") from None
        return self

    def stop(self) -> None:
        terminate(self.proc, 5)
        self.proc = None
