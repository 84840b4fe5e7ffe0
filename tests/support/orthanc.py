"""A real Orthanc 1.10.1 (+ DICOMweb plugin 1.7) process for integration tests.

Orthanc plays the archive behind the gateway: it receives STOW-RS (or C-STORE),
answers QIDO/WADO-RS, and can C-MOVE to test destinations. Each instance gets
its own free ports, config, storage and index under a temporary directory.
REST calls use only ``urllib`` so plain synchronous tests can use them.

Behaviour of these versions that tests must know (observed here, not assumed):

* Start-up with an empty index takes about 0.05 s until ``GET /system`` and the
  DICOM port answer. Stopping is slow: SIGTERM takes about 3.5 s (HTTP server
  ~2 s, DICOM server ~1 s, jobs engine), whatever the keep-alive and thread
  settings. ``kill()`` is instant. A restart on the same ports works at once
  and sees the same instances, after SIGTERM and after SIGKILL alike.
* STOW-RS of an instance that is already stored answers ``200`` and lists it
  under ReferencedSOPSequence with no WarningReason, whether
  OverwriteInstances is true or false: a duplicate is indistinguishable from
  a first store. C-STORE of a duplicate answers Success either way. REST
  ``POST /instances`` says ``"Status": "AlreadyStored"`` for a duplicate only
  when OverwriteInstances is false (``"Success"`` here, where it is true).
* STOW-RS with a part that is not DICOM answers ``400`` for the whole request
  even when other parts of it were stored: those are then listed in
  ReferencedSOPSequence and are in the archive, and FailedSOPSequence is
  empty. A 400 therefore does not mean "nothing stored".
* WADO-RS with ``Accept: multipart/related; type="application/dicom";
  transfer-syntax=*`` returns the data set exactly as stored (checked for all
  12 corpus transfer syntaxes with :func:`tests.support.compare.assert_same_dataset`);
  the part's own Content-Type is plain ``application/dicom`` without a
  transfer-syntax parameter. Without ``transfer-syntax=*`` (or with
  ``*/*``) Orthanc transcodes to Explicit VR Little Endian, e.g. a 10 KB JPEG
  comes back as 527 KB: always ask for ``*`` when checking fidelity.
* The answer's bytes equal ``GET /instances/{id}/file``, but not the file
  that was sent: the file meta group is Orthanc's own. Compare data sets.
* C-STORE is limited to the transfer syntaxes Orthanc's dcmtk 3.6.7 knows
  even with ``AcceptedTransferSyntaxes: ["*"]``: an HTJ2K (1.2.840.10008.1.2.4.201)
  context is rejected at negotiation. STOW-RS and REST upload of the same
  HTJ2K file succeed (the log shows "Unsupported transfer syntax" errors from
  decoding attempts) and WADO-RS ``transfer-syntax=*`` returns it unchanged.
* The STOW-RS RetrieveURL is built from the request's Host header because
  the config sets no ``DicomWeb.Host``; hard-coding a host drops the port.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from tests.support.ports import free_port, port_is_open
from tests.support.process import terminate

ORTHANC_BINARY = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
LOOPBACK = "127.0.0.1"

#: ``{name: (aet, host, port)}``; a dict value is passed to Orthanc verbatim
#: (for per-modality options such as ``AllowTranscoding``).
Modalities = Mapping[str, tuple[str, str, int] | Mapping[str, Any]]

WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class OrthancError(AssertionError):
    """An Orthanc REST call or process failure, with the log tail attached."""


def _iter_files(paths: Iterable[Path | str]) -> list[Path]:
    """Expand directories (recursively) into the files they contain."""
    files: list[Path] = []
    for entry in map(Path, paths):
        files.extend(sorted(p for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else [entry])
    return files


def parse_multipart_related(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """Split a ``multipart/related`` body into ``(headers, payload)`` pairs.

    Written by hand rather than with :mod:`email` because DICOM payloads are
    binary and must come back byte for byte; header names are lower-cased.
    """
    boundary = None
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ValueError(f"no boundary in Content-Type {content_type!r}")
    delimiter = b"--" + boundary.encode()
    parts: list[tuple[dict[str, str], bytes]] = []
    # Every delimiter follows a CRLF, except the first when there is no preamble.
    chunks = (b"\r\n" + body).split(b"\r\n" + delimiter)
    if len(chunks) < 2:
        raise ValueError("multipart body does not contain its boundary")
    for chunk in chunks[1:]:  # chunks[0] is the preamble
        if chunk.startswith(b"--"):
            break  # closing delimiter
        line_end = chunk.find(b"\r\n")
        if line_end < 0:
            raise ValueError("multipart delimiter line not terminated")
        chunk = chunk[line_end + 2 :]  # skips transport padding after the boundary
        if chunk.startswith(b"\r\n"):
            head, payload = b"", chunk[2:]
        else:
            head, sep, payload = chunk.partition(b"\r\n\r\n")
            if not sep:
                raise ValueError("multipart part without header/body separator")
        headers: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n"):
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
    return parts


def build_multipart_related(payloads: Iterable[bytes], part_type: str = "application/dicom") -> tuple[str, bytes]:
    """Build a STOW-RS style body; returns ``(content_type, body)``."""
    boundary = f"stow-{uuid.uuid4().hex}"
    body = bytearray()
    for payload in payloads:
        body += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        body += payload + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return f'multipart/related; type="{part_type}"; boundary={boundary}', bytes(body)


class Orthanc:
    """One Orthanc server on free loopback ports with throwaway storage.

    ``stop()`` keeps the storage and the ports so ``start()`` brings the same
    archive back where clients expect it (outage tests); ``cleanup()`` removes
    everything. Use as a context manager or through the pytest fixtures in
    :mod:`tests.support.fixtures`.
    """

    def __init__(
        self,
        aet: str = "ORTHANC",
        modalities: Modalities | None = None,
        extra_config: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        name: str | None = None,
        users: Mapping[str, str] | None = None,
    ) -> None:
        """``users``: ``{name: password}`` turns on HTTP basic authentication for REST
        and DICOMweb; this object's own REST calls then log in as the first user."""
        self._users = dict(users or {})
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.name = name or f"test-orthanc-{self.http_port}"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._modalities: dict[str, Any] = {}
        self._extra_config = dict(extra_config or {})
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: BinaryIO | None = None
        for modality_name, spec in (modalities or {}).items():
            self._modalities[modality_name] = dict(spec) if isinstance(spec, Mapping) else list(spec)
        self.write_config()

    # -- configuration ---------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The JSON configuration Orthanc is started with."""
        config: dict[str, Any] = {
            "Name": self.name,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": bool(self._users),
            "RegisteredUsers": self._users,
            "HttpCompressionEnabled": False,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "DicomModalities": self._modalities,
            "DicomModalitiesInDatabase": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "DicomAlwaysAllowMove": True,
            "UnknownSopClassAccepted": True,
            "AcceptedTransferSyntaxes": ["*"],
            "OverwriteInstances": True,
            "StorageCompression": False,
            # The archive is throwaway: fsync per instance only slows tests.
            "SyncStorageArea": False,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 30,
            "DicomThreadsCount": 4,
            "HttpThreadsCount": 50,
            "HttpTimeout": 60,
            "ConcurrentJobs": 2,
            "SynchronousCMove": True,
            "SaveJobs": False,
            "StableAge": 60,
            "MetricsEnabled": False,
            "DeidentifyLogs": False,
            "KeepAlive": True,
            "TcpNoDelay": True,
        }
        config.update(self._extra_config)
        return config

    def write_config(self) -> None:
        """(Re)write the config file; takes effect at the next start."""
        self.config_path.write_text(json.dumps(self.config(), indent=2))

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a C-MOVE destination at run time (REST, no restart) and in the config."""
        self._modalities[name] = [aet, host, port]
        self.write_config()
        if self.running:
            self._request("PUT", f"/modalities/{name}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())

    # -- process ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc and wait until REST and DICOM ports both answer."""
        if self.running:
            return self
        self.write_config()
        env = dict(os.environ)
        env["TCP_NODELAY"] = "1"
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - closed in _reap()
        try:
            process = self._process = subprocess.Popen(
                [str(ORTHANC_BINARY), str(self.config_path)],
                env=env,
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

            def ready() -> bool:
                if process.poll() is not None:
                    raise OrthancError(f"Orthanc exited with {process.returncode} at start-up:\n{self.log_tail()}")
                return self._system_answers() and port_is_open(LOOPBACK, self.dicom_port)

            deadline = time.monotonic() + timeout
            while not ready():
                if time.monotonic() > deadline:
                    raise OrthancError(f"Orthanc not ready after {timeout} s:\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.kill()
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; storage, index and ports are kept for a restart."""
        terminate(self._process, timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL (a crash, as far as clients can tell); data is kept."""
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        self._reap()

    def restart(self, timeout: float = 30.0) -> Orthanc:
        """Stop and start again on the same ports with the same data."""
        self.stop()
        return self.start(timeout=timeout)

    def cleanup(self) -> None:
        """End the server and delete the working directory if this object created it.
        Killed, not stopped: nothing of a throwaway server outlives its test, and a
        clean stop takes Orthanc 1.10 about 3.5 s (over a minute of the suite)."""
        self.kill()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _reap(self) -> None:
        self._process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of Orthanc's log, for failure messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()

    # -- addresses -------------------------------------------------------------

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """DICOMweb root without trailing slash, e.g. ``http://127.0.0.1:PORT/dicom-web``."""
        return f"{self.http_url}/dicom-web"

    # -- REST ------------------------------------------------------------------

    def _auth_headers(self) -> dict[str, str]:
        """Basic authentication as the first registered user, if any."""
        if not self._users:
            return {}
        user, password = next(iter(self._users.items()))
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def _system_answers(self) -> bool:
        request = urllib.request.Request(f"{self.http_url}/system", headers=self._auth_headers())
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def _request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        ok: Iterable[int] = (200,),
        timeout: float = 60.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request; statuses outside ``ok`` raise OrthancError."""
        url = path if path.startswith("http") else f"{self.http_url}{path}"
        request = urllib.request.Request(url, data=body, method=method, headers={**self._auth_headers(), **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, response_headers, payload = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, response_headers, payload = exc.code, dict(exc.headers), exc.read()
        if status not in set(ok):
            raise OrthancError(f"{method} {url} -> {status}: {payload[:500]!r}\n{self.log_tail(10)}")
        return status, response_headers, payload

    def get_json(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        return json.loads(self._request("GET", path)[2])

    def post_json(self, path: str, payload: Any) -> Any:
        """POST a JSON body to a REST resource and decode the JSON answer."""
        body = json.dumps(payload).encode()
        return json.loads(self._request("POST", path, body, {"Content-Type": "application/json"})[2])

    def instance_count(self) -> int:
        """Number of instances stored."""
        return int(self.get_json("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of every stored instance."""
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in self.get_json("/instances?expand")}

    def instance_id(self, sop_instance_uid: str) -> str:
        """Orthanc's identifier for a SOP Instance UID; KeyError if absent."""
        found = self.post_json("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        if not found:
            raise KeyError(sop_instance_uid)
        return str(found[0])

    def get_instance_bytes(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file (Orthanc's own file meta, stored data set)."""
        return self._request("GET", f"/instances/{self.instance_id(sop_instance_uid)}/file")[2]

    def dicomweb_instance(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> bytes:
        """WADO-RS retrieve of one instance as stored (``transfer-syntax=*``)."""
        path = f"/dicom-web/studies/{study_uid}/series/{series_uid}/instances/{sop_instance_uid}"
        _, headers, body = self._request("GET", path, headers={"Accept": WADO_ACCEPT})
        content_type = next(v for k, v in headers.items() if k.lower() == "content-type")
        parts = parse_multipart_related(content_type, body)
        if len(parts) != 1:
            raise OrthancError(f"WADO-RS returned {len(parts)} parts for one instance")
        return parts[0][1]

    def stow(self, payloads: Iterable[bytes], study_uid: str | None = None) -> tuple[int, Any]:
        """STOW-RS the given DICOM files' bytes; returns ``(status, DICOM JSON answer)``.

        Used to probe the archive directly (e.g. duplicate handling) without
        going through the gateway. Error statuses are returned, not raised.
        """
        content_type, body = build_multipart_related(payloads)
        path = "/dicom-web/studies" + (f"/{study_uid}" if study_uid else "")
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        status, _, answer = self._request("POST", path, body, headers, ok=range(100, 600))
        return status, json.loads(answer) if answer.strip() else None

    def upload(self, paths: Iterable[Path | str]) -> list[dict[str, Any]]:
        """Preload files (directories are walked) via REST ``POST /instances``."""
        results = []
        for path in _iter_files(paths):
            _, _, answer = self._request(
                "POST", "/instances", path.read_bytes(), {"Content-Type": "application/dicom"}
            )
            results.append(json.loads(answer))
        return results

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove one instance from the archive behind the gateway's back."""
        self._request("DELETE", f"/instances/{self.instance_id(sop_instance_uid)}")

    def clear(self) -> None:
        """Delete every patient (and so every instance)."""
        for patient in self.get_json("/patients"):
            self._request("DELETE", f"/patients/{patient}")
