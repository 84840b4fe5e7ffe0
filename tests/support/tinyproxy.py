"""A real forward HTTP proxy (Debian's tinyproxy) on a free loopback port: a hospital's
egress proxy, which every request leaving the network must go through."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.support.ports import free_port, wait_for_port
from tests.support.process import terminate

TINYPROXY = Path("/usr/bin/tinyproxy")
REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


class Tinyproxy:
    """``Tinyproxy(workdir).start()``; ``.url`` for HTTP(S)_PROXY; `requests` lists what
    went through it as (method, absolute URL or CONNECT target)."""

    def __init__(self, workdir: Path) -> None:
        if shutil.which(str(TINYPROXY)) is None:
            raise AssertionError(f"{TINYPROXY} missing: run scripts/install-test-deps.sh")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_path = workdir / "tinyproxy.log"
        self.config_path = workdir / "tinyproxy.conf"
        self.config_path.write_text(
            f'Port {self.port}\nListen 127.0.0.1\nTimeout 60\nLogFile "{self.log_path}"\nLogLevel Info\n'
            "MaxClients 64\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Tinyproxy:
        self.proc = subprocess.Popen(
            [str(TINYPROXY), "-d", "-c", str(self.config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port("127.0.0.1", self.port, 10)
        return self

    def stop(self) -> None:
        terminate(self.proc, 5)
        self.proc = None

    def requests(self) -> list[tuple[str, str]]:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return [(m.group(1), m.group(2)) for m in REQUEST_LINE.finditer(text)]
