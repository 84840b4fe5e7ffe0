"""A real rsyslogd (Debian's /usr/sbin/rsyslogd) as the Audit Record Repository's syslog
receiver: UDP (RFC 5426), TCP with octet counting (RFC 6587) or TLS (RFC 5425, with
rsyslog-gnutls), on free loopback ports.

It runs in the foreground with a config of its own and its own work directory, loads no
imuxsock or imklog (so it never takes over /dev/log or the kernel log) and writes only
inside the directory it is given: every message it receives, one per line, with the
RFC 5424 header fields a test checks in front of the message body.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.ports import free_port, wait_until
from tests.support.process import terminate

RSYSLOGD = Path("/usr/sbin/rsyslogd")
# Header fields have no spaces in RFC 5424, so a space separates them; the MSG comes last.
_TEMPLATE = "%pri% %app-name% %msgid% %procid% %hostname% %timereported:::date-rfc3339% %msg%\\n"


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for the TLS listener: the CA that signed ``cert`` (``key`` its key)."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Received:
    """One message as rsyslog parsed it."""

    pri: int
    app_name: str
    msgid: str
    procid: str
    hostname: str
    timestamp: str
    msg: str


class Rsyslog:
    """One rsyslogd listening on ``udp_port`` and/or ``tcp_port`` (TLS when ``tls``);
    `stop` and `start` again keep the ports, as a repository restart would."""

    def __init__(self, directory: Path, udp: bool = False, tcp: bool = False, tls: TlsFiles | None = None) -> None:
        if shutil.which(str(RSYSLOGD)) is None:
            raise AssertionError(f"{RSYSLOGD} missing: run scripts/install-test-deps.sh")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.output = directory / "received.log"
        self.udp_port = free_port() if udp else None
        self.tcp_port = free_port() if tcp or tls else None
        self.tls = tls
        self.config = directory / "rsyslog.conf"
        self.config.write_text(self._config())
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> str:
        d = self.directory
        lines = [
            # Before any input: the size limit applies to what the inputs accept. 64k is
            # twice what PS3.15 A.6 asks a receiver to take.
            f'global(workDirectory="{d}" maxMessageSize="64k")',
            f'template(name="audit" type="string" string="{_TEMPLATE}")',
            f'ruleset(name="audit") {{ action(type="omfile" file="{self.output}" template="audit") }}',
        ]
        if self.udp_port is not None:
            lines += [
                'module(load="imudp")',
                f'input(type="imudp" address="127.0.0.1" port="{self.udp_port}" ruleset="audit")',
            ]
        if self.tls is not None:
            lines += [
                (
                    f'global(DefaultNetstreamDriverCAFile="{self.tls.ca}"'
                    f' DefaultNetstreamDriverCertFile="{self.tls.cert}" DefaultNetstreamDriverKeyFile="{self.tls.key}")'
                ),
                # anon: rsyslog does not ask for a client certificate; the client still
                # verifies the server's.
                'module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")',
            ]
        elif self.tcp_port is not None:
            lines.append('module(load="imtcp")')
        if self.tcp_port is not None:
            lines.append(f'input(type="imtcp" address="127.0.0.1" port="{self.tcp_port}" ruleset="audit")')
        return "\n".join(lines) + "\n"

    def start(self) -> Rsyslog:
        log = open(self.directory / "rsyslogd.out", "ab")  # noqa: SIM115 - the process keeps it
        with log:
            self.process = subprocess.Popen(
                [str(RSYSLOGD), "-n", "-f", str(self.config), "-i", str(self.directory / "rsyslogd.pid")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        wait_until(self._listening, timeout=10, message=f"rsyslogd not listening (see {log.name})")
        return self

    def _listening(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"rsyslogd exited with {self.process.returncode}")
        return (self.udp_port is None or _bound("udp", self.udp_port)) and (
            self.tcp_port is None or _bound("tcp", self.tcp_port)
        )

    def stop(self) -> None:
        terminate(self.process, timeout=10)
        self.process = None

    def messages(self) -> list[Received]:
        """Every message received so far, in order."""
        if not self.output.exists():
            return []
        received = []
        for line in self.output.read_text(encoding="utf-8").splitlines():
            pri, app, msgid, procid, host, stamp, msg = line.split(" ", 6)
            received.append(Received(int(pri), app, msgid, procid, host, stamp, msg))
        return received

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """The messages once at least ``count`` arrived (omfile writes them a moment
        after they were received)."""
        def enough() -> list[Received] | None:
            received = self.messages()
            return received if len(received) >= count else None

        return wait_until(enough, timeout=timeout, message=f"rsyslogd did not receive {count} messages")


def _bound(protocol: str, port: int) -> bool:
    """Whether a socket is bound to 127.0.0.1:port (for TCP: listening), read from
    /proc/net, so that checking never sends rsyslog a connection or a message."""
    wanted = f"0100007F:{port:04X}"
    with open(f"/proc/net/{protocol}") as table:
        for row in table.readlines()[1:]:
            fields = row.split()
            if fields[1] == wanted and (protocol == "udp" or fields[3] == "0A"):
                return True
    return False


@contextmanager
def rsyslog(directory: Path, udp: bool = False, tcp: bool = False, tls: TlsFiles | None = None) -> Iterator[Rsyslog]:
    """A started `Rsyslog`, stopped at exit."""
    server = Rsyslog(directory, udp=udp, tcp=tcp, tls=tls)
    try:
        yield server.start()
    finally:
        server.stop()
