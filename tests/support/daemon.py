"""Run the real gateway daemon (``python -m gateway run``) on free loopback ports.

Tests drive it exactly as an admin would: a TOML file, a process, signals, its DIMSE
port and its /healthz endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.support.ports import free_port, wait_for_port, wait_until

REPO = Path(__file__).resolve().parents[2]


class Gateway:
    """One gateway process with its own config and spool directory."""

    def __init__(
        self,
        workdir: Path,
        upstream_url: str | None = None,
        ae_title: str = "DICOMGW",
        extra: str = "",
        spool: dict[str, Any] | None = None,
        dimse: dict[str, Any] | None = None,
        spool_dir: Path | None = None,
        http: dict[str, Any] | None = None,
        http_auth: dict[str, Any] | None = None,
        wrapper: Sequence[str] = (),
        run_args: Sequence[str] = (),
        upstream: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``http``/``http_auth``: keys of ``[http]`` and ``[http.auth]`` (the facade's
        base path, CORS origins, credentials). ``spool_dir``: put the spool elsewhere
        (another file system, or another gateway's spool). ``run_args``: more options of
        ``dicom-gateway run`` (e.g. ``--log-format json``). ``wrapper``: a command the
        daemon runs under, e.g.
        ``["/usr/bin/strace", "-f", "-o", path]``; signals go to the whole process
        group, so they reach the daemon itself, not only the wrapper. ``upstream``:
        the body of the ``[upstream]`` table as TOML, instead of one built from
        ``upstream_url``. ``env``: variables set for the daemon (and `cli`) on top of
        the test's environment (e.g. ``NOTIFY_SOCKET``); replace it before a restart to
        change them."""
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ae_title = ae_title
        self.port = free_port()
        self.http_port = free_port()
        self.spool_dir = spool_dir if spool_dir is not None else workdir / "spool"
        self.wrapper = list(wrapper)
        self.run_args = list(run_args)
        self.env = dict(env or {})
        self.config_path = workdir / "gateway.toml"
        self.log_path = workdir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        http_lines = "".join(f"{k} = {_toml(v)}\n" for k, v in (http or {}).items())
        auth_lines = "".join(f"{k} = {_toml(v)}\n" for k, v in (http_auth or {}).items())
        dimse_lines = "".join(f"{k} = {_toml(v)}\n" for k, v in (dimse or {}).items())
        spool_lines = "".join(
            f"{k} = {_toml(v)}\n"
            for k, v in {
                "min_free_mb": 1,
                # Each daemon of the suite starts on an empty spool: 64 MiB of blanks for
                # each of ~150 daemons would be ~10 GB written for nothing.
                "reserve_mb": 4,
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 2.0,
                **(spool or {}),
            }.items()
        )
        if upstream is None:
            upstream = (
                f'type = "dicomweb"\nurl = "{upstream_url}"\ntimeout = 30\n'
                if upstream_url
                else 'type = "local"\n'
            )
        self.config_path.write_text(
            f'[dimse]\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n'
            f"shutdown_grace = 5\n{dimse_lines}\n"
            f'[spool]\ndirectory = "{self.spool_dir}"\n{spool_lines}\n'
            f"[upstream]\n{upstream}\n"
            f'[http]\nhost = "127.0.0.1"\nport = {self.http_port}\n{http_lines}\n'
            f"[http.auth]\n{auth_lines}\n"
            f'[logging]\nlevel = "INFO"\n{extra}'
        )

    def start(self, timeout: float = 30.0) -> Gateway:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.wrapper, sys.executable, "-m", "gateway", "run", "--config", str(self.config_path), *self.run_args],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **self.env},
        )
        log.close()
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
        except Exception:
            self.kill()
            raise AssertionError(f"gateway did not start:\n{self.log()}") from None
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"gateway ignored SIGTERM for {timeout}s:\n{self.log()}") from None
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self._signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def _signal(self, sig: int) -> None:
        """Signal the daemon's process group (the daemon and any wrapper around it)."""
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/healthz", timeout=10
        ) as resp:
            return json.loads(resp.read())

    @property
    def web_url(self) -> str:
        """The HTTP root (``/healthz``, and the facade's roots below it)."""
        return f"http://127.0.0.1:{self.http_port}"

    def counts(self) -> dict[str, int]:
        return self.health()["spool"]["counts"]

    def wait_counts(self, timeout: float = 60.0, **expected: int) -> dict[str, int]:
        """Wait until the spool counts include ``expected`` (e.g. delivered=50)."""
        last: dict[str, int] = {}

        def ok() -> bool:
            nonlocal last
            last = self.counts()
            return all(last.get(k) == v for k, v in expected.items())

        try:
            wait_until(ok, timeout, 0.2, f"spool counts never reached {expected}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last counts {last}") from None
        return last

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``dicom-gateway`` against this gateway's config."""
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", str(self.config_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **self.env},
        )


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return str(value)

